"""Checkpoints: atomic writes, the previous one kept, damaged files named, RNG state, resume_from."""

import json
import sys

import pytest
import torch

from spiking_moe.data import BatchLoader
from spiking_moe.training import (
    CheckpointError,
    Trainer,
    load_checkpoint,
    previous_checkpoint,
    save_checkpoint,
    seed_everything,
)

# The package's names shadow nothing here, but os.replace is patched in the module itself.
checkpoint_module = sys.modules["spiking_moe.training.checkpoint"]


@pytest.fixture
def trained(tiny_snn, two_class_data, train_config):
    """``trained(out_dir, steps, **trainer_kwargs)`` -> the closed Trainer after ``steps``."""

    def run(out_dir, steps, **kwargs):
        seed_everything(0)
        trainer = Trainer(
            tiny_snn(),
            BatchLoader(two_class_data(), 16, shuffle=True),
            train_config(max_steps=steps, checkpoint_every=1),
            out_dir=out_dir,
            **kwargs,
        )
        trainer.fit()
        trainer.close()
        return trainer

    return run


def test_checkpoint_write_is_atomic(tmp_path, trained, monkeypatch):
    trainer = trained(tmp_path, 5)
    path = tmp_path / "checkpoint.pt"
    before = load_checkpoint(path)
    assert before["step"] == 5

    def killed(src, dst):
        raise OSError("simulated kill between write and replace")

    trainer.step = 99
    with torch.no_grad():
        trainer.model.fc1.weight.add_(1.0)
    monkeypatch.setattr(checkpoint_module.os, "replace", killed)
    with pytest.raises(OSError, match="simulated kill"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    after = load_checkpoint(path)  # weights_only=True
    assert after["step"] == 5
    assert torch.equal(after["model"]["fc1.weight"], before["model"]["fc1.weight"])
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_each_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    assert previous_checkpoint(path) == tmp_path / "checkpoint.prev.pt"
    save_checkpoint({"step": 1}, path)
    assert not previous_checkpoint(path).exists()
    save_checkpoint({"step": 2}, path)
    save_checkpoint({"step": 3}, path)
    assert load_checkpoint(path)["step"] == 3
    assert load_checkpoint(previous_checkpoint(path))["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_checkpoint_loads_with_weights_only_and_holds_rng_state(tmp_path, trained):
    save_checkpoint({"a": torch.ones(2)}, tmp_path / "c.pt")
    trained(tmp_path / "run", 3)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "step", "epoch", "batch_in_epoch"} <= set(
        state
    )
    assert set(state["rng"][0]) == {"torch", "cuda", "numpy", "python"}
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["a"], torch.ones(2))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "none.pt")


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # a copy cut short
        lambda data: b"",  # an empty file
        lambda data: b"not a checkpoint at all" * 10,
    ],
    ids=["truncated", "empty", "garbage"],
)
def test_a_damaged_checkpoint_names_itself_and_the_intact_previous_one(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 4, "w": torch.arange(1000.0)}, path)
    save_checkpoint({"step": 8, "w": torch.arange(1000.0)}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"checkpoint {path} is damaged" in message
    assert f"{previous_checkpoint(path)} (step 4) is intact" in message
    assert f"--resume-from {previous_checkpoint(path)}" in message
    assert info.value.path == path and info.value.previous == previous_checkpoint(path)

    previous_checkpoint(path).write_bytes(b"")
    with pytest.raises(CheckpointError, match="previous checkpoint .* is damaged too") as info:
        load_checkpoint(path)
    assert info.value.previous is None


def test_a_file_that_is_not_a_checkpoint_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointError, match="not a checkpoint dict"):
        load_checkpoint(path)


def test_resume_on_a_damaged_checkpoint_raises_and_resume_from_the_previous_one_continues(
    tmp_path, trained
):
    trained(tmp_path, 4)  # checkpoints after every step: prev is step 3
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"checkpoint\.prev\.pt \(step 3\) is intact"):
        trained(tmp_path, 6, resume=True)
    resumed = trained(tmp_path, 6, resume_from=previous_checkpoint(path))
    assert resumed.step == 6
    assert load_checkpoint(path)["step"] == 6
    with pytest.raises(FileNotFoundError, match="resume_from: no checkpoint"):
        trained(tmp_path, 6, resume_from=tmp_path / "missing.pt")


def test_resume_from_an_earlier_checkpoint_logs_each_step_once(tmp_path, trained):
    """Resuming from checkpoint.prev.pt (step 3) after a run reached step 4 repeats step 4:
    metrics.jsonl holds it once, as TensorBoard does (its purge_step)."""
    trained(tmp_path, 4)  # checkpoints after every step: prev is step 3
    trained(tmp_path, 6, resume_from=previous_checkpoint(tmp_path / "checkpoint.pt"))
    steps = [
        record["step"]
        for record in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in record
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 6, steps
