"""TOML configs: the shipped ones parse; bad ones fail with errors naming the field."""

from pathlib import Path

import pytest
import torch

from spiking_moe.args import MoEArgs
from spiking_moe.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    config_to_dict,
    flatten_config,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def _write(tmp_path, text, name="exp.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    config = load_config(path, check_files=False)
    assert config.name == path.stem
    assert config.model.moe.k <= config.model.moe.num_experts


def test_expected_shipped_configs_exist():
    names = {p.stem for p in CONFIGS.glob("*.toml")}
    assert {"default", "mnist1d_moe", "mnist1d_dense_snn", "mnist1d_ann", "shd_moe"} <= names
    assert load_config(CONFIGS / "mnist1d_dense_snn.toml").model.kind == "dense_snn"
    assert load_config(CONFIGS / "mnist1d_ann.toml").model.kind == "ann"


def test_values_are_read_and_defaults_filled(tmp_path):
    path = _write(
        tmp_path,
        'name = "x"\n[train]\nlr = 1\nepochs = 3\namp = true\n[model]\nalpha = 2\nk = 2\n',
    )
    config = load_config(path)
    assert config.name == "x"
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)  # int widened
    assert config.train.epochs == 3 and config.train.amp is True
    assert config.model.neuron.alpha == 2.0 and config.model.moe.k == 2  # old flat keys
    assert config.data == DataConfig() and config.model.router.capacity_factor is None
    assert load_config(_write(tmp_path, "", "plain.toml")).name == "plain"
    flat = flatten_config(config)
    assert flat["train.lr"] == 1.0 and flat["model.kind"] == "moe"
    assert flat["model.neuron.alpha"] == 2.0 and flat["model.moe.k"] == 2
    assert "capacity_factor" not in config_to_dict(config)["model"]["router"]


@pytest.mark.parametrize(
    "text, pattern",
    [
        (
            "[train]\nlrr = 0.1\n",
            r"unknown key\(s\) \['train\.lrr'\].*allowed in \[train\]: \[.*'lr'",
        ),
        ("[training]\nlr = 0.1\n", r"unknown key\(s\) \['training'\].*allowed: \['name', 'data'"),
        ('[train]\nepochs = "ten"\n', r"train\.epochs must be an integer, got 'ten'"),
        ("[train]\nepochs = 2.5\n", r"train\.epochs must be an integer"),
        ("[train]\nprogress = 1\n", r"train\.progress must be true or false, got 1"),
        ("[train]\nlr = true\n", r"train\.lr must be a number, got True"),
        ("[train]\nlr = -1\n", r"train\.lr must be > 0\.0, got -1\.0"),
        ("[train]\nlr = nan\n", r"train\.lr must be finite"),
        (
            "[model.moe]\nnum_experts = 2\nk = 3\n",
            r"model\.moe\.k must be <= model\.moe\.num_experts \(2\), got 3",
        ),
        (  # old flat keys are read as their nested fields, errors name those
            "[model]\nnum_experts = 2\nk = 3\n",
            r"model\.moe\.k must be <= model\.moe\.num_experts \(2\), got 3",
        ),
        ("[model.neuron]\nbeta = 1.5\n", r"model\.neuron\.beta must be <= 1\.0, got 1\.5"),
        ("[model]\nbeta = 1.5\n", r"model\.neuron\.beta must be <= 1\.0, got 1\.5"),
        (
            "[model.router]\nnois = 1\n",
            r"unknown key\(s\) \['model\.router\.nois'\]; allowed in \[model\.router\]: \['kind'",
        ),
        (
            "[model]\nnum_experts = 2\n[model.moe]\nnum_experts = 4\n",
            r"model\.num_experts and model\.moe\.num_experts are the same option given twice",
        ),
        ("[model]\nmoe = 3\n", r"model\.moe must be a table"),
        (
            '[model]\nkind = "transformer"\n',
            r"model\.kind must be one of \['moe', 'dense_snn', 'ann'\]",
        ),
        (
            '[model.neuron]\nsurrogate = "relu"\n',
            r"model\.neuron\.surrogate must be one of \[.*'fast_sigmoid'",
        ),
        (
            '[data]\nname = "cifar"\n',
            r"data\.name must be one of \['digits', 'mnist1d', 'shd', 'nmnist', 'text'\]",
        ),
        (
            '[data]\nencoding = "sequence"\n',
            r"data\.encoding must be one of \['default', 'rate', 'latency', 'current'\] for dataset 'digits'",
        ),
        ('[data]\nname = "shd"\n', r"data\.root must name the folder"),
        (
            '[train]\ndevice = "tpu"\n',
            r"train\.device must be one of \['auto', 'cpu', 'cuda', 'cuda:N'\]",
        ),
        (
            "[data]\nval_fraction = 0.5\ntest_fraction = 0.5\n",
            r"data\.val_fraction \+ data\.test_fraction must be < 1",
        ),
        ("train = 3\n", r"train must be a table"),
        ("[train\n", r"invalid TOML"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, text, pattern):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_dataset_file_names_root_and_path(tmp_path):
    root = tmp_path / "shd_data"
    path = _write(tmp_path, f'[data]\nname = "shd"\nroot = "{root}"\n')
    with pytest.raises(ConfigError, match=rf"data\.root: .*{root / 'shd_train.h5'}"):
        load_config(path)
    root.mkdir()
    (root / "shd_train.h5").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"shd_test\.h5") as info:
        load_config(path)
    assert "shd_train.h5" not in str(info.value)
    assert load_config(path, check_files=False).data.root == str(root)


def test_programmatic_construction_is_validated_too():
    with pytest.raises(ConfigError, match=r"train\.warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ConfigError, match=r"moe\.k must be <="):
        MoEArgs(num_experts=1, k=2)
    with pytest.raises(ConfigError, match=r"model\.moe\.k must be <="):
        ModelConfig.from_dict({"moe": {"num_experts": 1, "k": 2}})
    with pytest.raises(ConfigError, match="unknown key"):
        ExperimentConfig.from_dict({"model": {"experts": 4}})


def test_overrides_are_toml_values_validated_like_the_file():
    from spiking_moe.config import apply_overrides, parse_override

    assert parse_override("train.lr=3e-3") == (("train", "lr"), 3e-3)
    assert parse_override("data.encoding=latency") == (("data", "encoding"), "latency")
    assert parse_override('model.router="spiking"') == (("model", "router"), "spiking")
    assert parse_override("train.amp=true") == (("train", "amp"), True)
    base = ExperimentConfig()
    # Applied together, then validated: E and k may change in one go; old flat keys are read
    # as their nested fields.
    config = apply_overrides(base, ["model.num_experts=12", "model.moe.k=6", "name=big"])
    assert (config.model.moe.num_experts, config.model.moe.k, config.name) == (12, 6, "big")
    config = apply_overrides(base, ["model.router.noise=0.25", "model.router_window=3"])
    assert (config.model.router.noise, config.model.router.window) == (0.25, 3)
    assert apply_overrides(base, ["model.router=spiking"]).model.router.kind == "spiking"
    assert config.train == base.train
    assert apply_overrides(base, []) == base
    for bad, pattern in [
        (
            "train.epochs=2.5",
            r"train\.epochs must be an integer.*\(with --set train\.epochs=2\.5\)",
        ),
        ("train.nope=1", r"unknown key\(s\) \['train\.nope'\]"),
        ("nope.lr=1", r"unknown section 'nope'; valid: \['data', 'model', 'train', 'energy'\]"),
        ("lr=1", r"top-level key must be 'name' or section\.key"),
        ("train.lr.x=1", r"key must be section\.key"),
        ("=1", r"--set needs section\.key=value"),
        ("model.k=9", r"model\.moe\.k must be <= model\.moe\.num_experts \(8\), got 9"),
        ("model.moe.nope=1", r"unknown key\(s\) \['model\.moe\.nope'\]"),
        ("train.lr.x=1", r"key must be section\.key"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            apply_overrides(base, [bad])


def test_grad_accum_steps_is_validated():
    assert TrainConfig(grad_accum_steps=4).grad_accum_steps == 4
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps must be >= 1, got 0"):
        TrainConfig(grad_accum_steps=0)


def test_an_old_flat_key_is_read_as_its_nested_field_and_says_so(tmp_path, caplog):
    old = load_config(_write(tmp_path, "[model]\nnum_experts = 6\nrouter_window = 0\n"))
    new = load_config(_write(tmp_path, "[model.moe]\nnum_experts = 6\n", "new.toml"))
    assert old.model == new.model and old.model.router.window is None  # 0 meant "unset"
    assert "model.num_experts is now model.moe.num_experts" in caplog.text


@pytest.mark.parametrize("language_model", [False, True])
def test_a_model_from_toml_equals_the_model_from_keyword_arguments(tmp_path, language_model):
    """The TOML tables and the constructors' keywords set the same options."""
    from spiking_moe.factory import build_model
    from spiking_moe.models import SpikingMoEClassifier
    from spiking_moe.transformer import SpikingMoELM

    text = (
        "[model]\nhidden_features = 16\nnum_layers = 2\nreadout = 'membrane'\n"
        "[model.moe]\nnum_experts = 4\nk = 2\nshared_experts = 1\nshared_hidden = 8\n"
        "[model.expert]\nhidden = 16\n"
        "[model.router]\nkind = 'spiking'\nnoise = 0.5\ncapacity_factor = 1.5\ngain = 3.0\n"
        "[model.neuron]\nbeta = 0.8\nthreshold = 0.4\nreset = 'zero'\nlearn_beta = true\n"
        "[model.attention]\nnum_heads = 2\n"
    )
    config = load_config(_write(tmp_path, text)).model
    keywords = dict(
        num_experts=4, k=2, shared_experts=1, shared_hidden=8, expert_hidden=16,
        readout="membrane", router="spiking", noise=0.5, capacity_factor=1.5, gain=3.0,
        beta=0.8, threshold=0.4, reset="zero", learn_beta=True,
    )  # fmt: skip
    torch.manual_seed(0)
    if language_model:
        from_toml = build_model(config, in_features=32, num_classes=32, num_steps=3, context=6)
        torch.manual_seed(0)
        from_keywords = SpikingMoELM(32, 16, 2, 2, 6, num_steps=3, **keywords)
        x = torch.randint(0, 32, (2, 6))
    else:
        from_toml = build_model(config, in_features=5, num_classes=3, num_steps=4)
        torch.manual_seed(0)
        from_keywords = SpikingMoEClassifier(
            5, 3, hidden_features=16, num_moe_layers=2, num_heads=2, **keywords
        )
        x = (torch.rand(4, 6, 5) < 0.5).float()
    assert from_toml.args == from_keywords.args
    state, other = from_toml.state_dict(), from_keywords.state_dict()
    assert state.keys() == other.keys()
    for name in state:
        assert torch.equal(state[name], other[name]), name
    for model in (from_toml, from_keywords):
        model.train()  # router noise on: the same draws from the same seed
    torch.manual_seed(1)
    a = from_toml(x)
    torch.manual_seed(1)
    b = from_keywords(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.aux_loss, b.aux_loss)
