"""The language model end to end: training on text through the CLI, resume, generation, and
the energy counts of a real spiking MoE LM (attention products, shared experts)."""

import hashlib
import json
import math

import pytest
import torch

import energy
from spiking_moe import SpikingMoELM, Trainer
from spiking_moe.cli import generate_main, train_main
from spiking_moe.config import TrainConfig
from spiking_moe.data import BatchLoader, TextDataset
from spiking_moe.training import count_energy, seed_everything

TINY_LM = [
    "--set", "data.name=text",
    "--set", "data.context=16",
    "--set", "data.num_steps=2",
    "--set", "data.eval_windows=16",
    "--set", "model.kind=moe",
    "--set", "model.hidden_features=16",
    "--set", "model.num_heads=2",
    "--set", "model.num_moe_layers=1",
    "--set", "model.num_experts=4",
    "--set", "model.moe.k=1",
    "--set", "model.expert_hidden=16",
    "--set", "model.shared_experts=1",
    "--set", "model.capacity_factor=1.5",
    "--set", "train.max_steps=6",
    "--set", "train.batch_size=8",
    "--set", "train.eval_batch_size=16",
    "--set", "train.eval_every=3",
    "--set", "train.device=cpu",
    "--set", "train.progress=false",
]  # fmt: skip


def write_corpus(folder, files=12, size=400):
    """A small folder of text files whose bytes the test knows."""
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    words = [b"def ", b"return ", b"self", b"(x)", b": ", b"\n    ", b"import os\n", b"0"]
    for i in range(files):
        picks = torch.randint(0, len(words), (size,), generator=rng).tolist()
        (folder / f"f{i:02d}.py").write_bytes(b"".join(words[p] for p in picks))
    return folder


@pytest.mark.slow
def test_cli_trains_a_spiking_moe_lm_on_text_and_generates(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    code = train_main(
        ["--config", "experiments/configs/lm_moe.toml", "--out", str(out), *TINY_LM,
         "--set", f"data.text_paths=['{corpus}']"]
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "result.json").read_text())["metrics"]
    # bits per byte is the cross-entropy in bits: loss / ln 2.
    assert result["test/bpb"] == pytest.approx(result["test/loss"] / math.log(2))
    assert 0 < result["val/bpb"] < 8.5  # at most about uniform over 256 bytes (8 bits)
    assert result["test/energy/uJ_per_token"] > 0
    assert "test/energy/uJ_per_sample" not in result
    recorded = json.loads((out / "config.json").read_text())["data_metadata"]
    all_bytes = b"".join(p.read_bytes() for p in sorted(corpus.iterdir()))
    assert recorded["sha256"] == hashlib.sha256(all_bytes).hexdigest()
    assert (out / "report.md").read_text().startswith("**Energy per token:")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out)).Reload()
    for tag in ("val/bpb", "val/energy/uJ_per_token", "test/bpb"):
        assert events.Scalars(tag), tag  # TensorBoard curves of bits per byte and energy
    assert [e.step for e in events.Scalars("val/bpb")] == [3, 6]

    capsys.readouterr()
    args = ["--checkpoint", str(out / "checkpoint.pt"), "--max-new-tokens", "12"]
    assert generate_main([*args, "--prompt", "def ", "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("def ") and len(first.rstrip("\n").encode("utf-8", "replace")) >= 4
    assert generate_main([*args, "--prompt", "def ", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == first  # temperature 0: the most likely bytes, again
    assert generate_main([*args, "--prompt", ""]) == 2
    assert generate_main([*args[:2], "--max-new-tokens", "-1"]) == 2


def test_generate_refuses_a_checkpoint_that_is_not_a_language_model(tmp_path, caplog):
    assert generate_main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "no checkpoint" in caplog.text


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return SpikingMoELM(
        256, 16, 1, 2, 8, num_experts=4, k=1, expert_hidden=16, shared_experts=1, num_steps=2
    )


def text_loader(batch_size=4):
    data = torch.tensor(list(b"the cat sat on the mat. " * 40), dtype=torch.uint8)
    return BatchLoader(TextDataset(data, context=8), batch_size, shuffle=True, seed=3)


def test_lm_resume_equals_an_uninterrupted_run(tmp_path):
    from spiking_moe.training import Callback

    class Stop(Callback):
        def __init__(self, at):
            self.at = at

        def on_train_step_end(self, trainer, outputs, loss):
            if trainer.step == self.at:
                trainer.request_stop()

    config = TrainConfig(max_steps=10, batch_size=4, device="cpu", progress=False, lr=3e-3)

    def run(out, callbacks=(), resume=False):
        seed_everything(0)
        with Trainer(
            tiny_lm(), text_loader(), config, out_dir=out, callbacks=callbacks, resume=resume
        ) as trainer:
            result = trainer.fit()
        return trainer, result

    straight, _ = run(tmp_path / "straight")
    _, stopped = run(tmp_path / "split", [Stop(4)])
    assert stopped.interrupted and stopped.step == 4
    resumed, result = run(tmp_path / "split", resume=True)
    assert result.step == 10
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_energy_of_a_spiking_moe_lm_counts_attention_and_shared_experts():
    model = tiny_lm().eval()
    ids = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(1))
    counts, dense = count_energy(model, ids)
    kinds = {layer.name: layer.kind for layer in counts.layers}
    assert kinds["blocks.0.attn.scores"] == "matmul" and kinds["blocks.0.attn.mix"] == "matmul"
    groups = counts.groups()
    shared = groups["blocks.0.ffn.shared_experts.0"]
    assert shared.tokens == 3 * 8  # every position
    routed = [g for label, g in groups.items() if ".ffn.experts." in label]
    assert sum(g.tokens for g in routed) == 3 * 8  # k = 1, no capacity limit
    in_groups = sum(g.acs for g in groups.values())
    outside = sum(layer.acs for layer in counts.layers if layer.group is None)
    assert in_groups + outside == counts.total("acs")
    # Scores Q K^T with binary Q: each query spike reaches the i + 1 keys it may see.
    with torch.no_grad():
        spikes = {}
        hooks = [
            model.blocks[0].attn.q_neuron.register_forward_hook(
                lambda m, i, o: spikes.__setitem__("q", o)
            )
        ]
        model(ids)
        for h in hooks:
            h.remove()
    q_TBSD = spikes["q"]
    reach_S = torch.arange(1, 9).view(1, 1, 8, 1)  # query position i sees i + 1 keys
    assert counts.layer("blocks.0.attn.scores").acs == int((q_TBSD * reach_S).sum())
    # The dense twin computes every routed expert on every position; attention is unchanged.
    assert dense.layer("blocks.0.attn.scores").acs == counts.layer("blocks.0.attn.scores").acs
    dense_routed = [g for label, g in dense.groups().items() if ".ffn.experts." in label]
    assert all(g.tokens == 3 * 8 for g in dense_routed)
    report = energy.build_report(counts, "cmos45", dense_counts=dense)
    assert report.totals.energy_pj > 0 and "blocks.0.attn.scores" in report.to_markdown()
