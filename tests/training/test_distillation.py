"""Logit distillation (train.distill_from): the objective against a hand-written KL, the
teacher left untouched by training, the CLI end to end, and the errors that name the field."""

import json
import math

import pytest
import torch
from torch.nn import functional as F

from spiking_moe.config import ConfigError, TrainConfig
from spiking_moe.training.objective import distillation_loss, micro_batch_loss


def test_the_distillation_term_is_tau_squared_times_the_kl_written_out():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    y = torch.randint(0, 7, (2, 5), generator=g)
    tau, alpha = 2.0, 0.3
    config = TrainConfig(distill_weight=alpha, distill_temperature=tau)
    loss, stats = micro_batch_loss(student, y, F.cross_entropy, config, teacher)
    # KL(p_t || p_s) = sum_c p_t,c (log p_t,c - log p_s,c), by hand over every prediction.
    kl = 0.0
    for s_row, t_row in zip(
        student.reshape(-1, 7).tolist(), teacher.reshape(-1, 7).tolist(), strict=True
    ):
        z_s = math.log(sum(math.exp(v / tau) for v in s_row))
        z_t = math.log(sum(math.exp(v / tau) for v in t_row))
        for s_c, t_c in zip(s_row, t_row, strict=True):
            log_t, log_s = t_c / tau - z_t, s_c / tau - z_s
            kl += math.exp(log_t) * (log_t - log_s)
    kl /= 10
    ce = F.cross_entropy(student.reshape(-1, 7), y.reshape(-1))
    assert float(loss) == pytest.approx((1 - alpha) * float(ce) + alpha * tau**2 * kl, rel=1e-5)
    # what is logged (and read as bits per byte) stays the plain cross-entropy
    assert float(stats.cross_entropy) == pytest.approx(float(ce), rel=1e-6)
    # alpha = 0: the teacher changes nothing
    plain, _ = micro_batch_loss(student, y, F.cross_entropy, TrainConfig())
    zero, _ = micro_batch_loss(
        student, y, F.cross_entropy, TrainConfig(distill_weight=0.0), teacher
    )
    assert float(zero) == pytest.approx(float(plain), rel=1e-6)
    assert float(distillation_loss(teacher.reshape(-1, 7), teacher.reshape(-1, 7), tau)) == 0.0


def test_teacher_logits_of_another_vocabulary_are_refused_naming_the_field():
    y = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="train.distill_from: the teacher's logits"):
        micro_batch_loss(
            torch.zeros(2, 3, 8), y, F.cross_entropy, TrainConfig(), torch.zeros(2, 3, 9)
        )


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(distill_weight=1.5), r"train\.distill_weight must be <= 1"),
        (dict(distill_temperature=0.0), r"train\.distill_temperature must be > 0"),
    ],
)
def test_bad_distillation_options_name_the_field(options, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**options)


@pytest.mark.slow
def test_the_cli_distils_a_spiking_lm_from_a_trained_ann_and_leaves_the_teacher_alone(
    tmp_path, caplog
):
    from spiking_moe.cli import train_main
    from tests.test_lm import TINY_LM, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    common = [*TINY_LM, "--set", f"data.text_paths=['{corpus}']", "--set", "energy.enabled=false"]
    teacher_dir = tmp_path / "ann"
    assert train_main(
        ["--config", "experiments/configs/lm_ann.toml", "--out", str(teacher_dir), *common,
         "--set", "model.kind=ann"]
    ) == 0  # fmt: skip
    teacher_ckpt = teacher_dir / "checkpoint.pt"
    before = teacher_ckpt.read_bytes()
    student = tmp_path / "student"
    assert train_main(
        ["--config", "experiments/configs/lm_moe.toml", "--out", str(student), *common,
         "--set", f"train.distill_from='{teacher_ckpt}'", "--set", "train.distill_weight=0.5"]
    ) == 0  # fmt: skip
    assert teacher_ckpt.read_bytes() == before
    metrics = json.loads((student / "result.json").read_text())["metrics"]
    assert 0 < metrics["test/bpb"] < 8.5
    recorded = json.loads((student / "config.json").read_text())["train"]
    assert recorded["distill_from"] == str(teacher_ckpt)

    missing = tmp_path / "nowhere.pt"
    assert train_main(
        ["--config", "experiments/configs/lm_moe.toml", "--out", str(tmp_path / "x"), *common,
         "--set", f"train.distill_from='{missing}'"]
    ) == 2  # fmt: skip
    assert "train.distill_from: no checkpoint" in caplog.text
