"""TOML configs: the shipped ones parse; bad ones fail with errors naming the field."""

from pathlib import Path

import pytest

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
    assert config.model.k <= config.model.num_experts


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
    assert config.model.alpha == 2.0 and config.model.k == 2
    assert config.data == DataConfig() and config.model.capacity_factor is None
    assert load_config(_write(tmp_path, "", "plain.toml")).name == "plain"
    flat = flatten_config(config)
    assert flat["train.lr"] == 1.0 and flat["model.kind"] == "moe"
    assert "model.capacity_factor" not in config_to_dict(config)["model"]


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
            "[model]\nnum_experts = 2\nk = 3\n",
            r"model\.k must be <= model\.num_experts \(2\), got 3",
        ),
        ("[model]\nbeta = 1.5\n", r"model\.beta must be <= 1\.0, got 1\.5"),
        (
            '[model]\nkind = "transformer"\n',
            r"model\.kind must be one of \['moe', 'dense_snn', 'ann'\]",
        ),
        ('[model]\nsurrogate = "relu"\n', r"model\.surrogate must be one of \[.*'fast_sigmoid'"),
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
    with pytest.raises(ConfigError, match=r"model\.k must be <="):
        ModelConfig(num_experts=1, k=2)
    with pytest.raises(ConfigError, match="unknown key"):
        ExperimentConfig.from_dict({"model": {"experts": 4}})


def test_overrides_are_toml_values_validated_like_the_file():
    from spiking_moe.config import apply_overrides, parse_override

    assert parse_override("train.lr=3e-3") == (("train", "lr"), 3e-3)
    assert parse_override("data.encoding=latency") == (("data", "encoding"), "latency")
    assert parse_override('model.router="spiking"') == (("model", "router"), "spiking")
    assert parse_override("train.amp=true") == (("train", "amp"), True)
    base = ExperimentConfig()
    # Applied together, then validated: E and k may change in one go.
    config = apply_overrides(base, ["model.num_experts=8", "model.k=6", "name=big"])
    assert (config.model.num_experts, config.model.k, config.name) == (8, 6, "big")
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
        ("model.k=9", r"model\.k must be <= model\.num_experts \(4\), got 9"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            apply_overrides(base, [bad])


def test_grad_accum_steps_is_validated():
    assert TrainConfig(grad_accum_steps=4).grad_accum_steps == 4
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps must be >= 1, got 0"):
        TrainConfig(grad_accum_steps=0)
