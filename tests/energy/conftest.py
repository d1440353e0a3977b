import pytest
import torch

from energy import _native, counting


@pytest.fixture
def accelerator_accumulation(monkeypatch):
    """Count on the CPU as on an accelerator: every count a device tensor, PyTorch's scans,
    so the CPU can check what only a GPU would otherwise run (e.g. that hooks read nothing)."""
    monkeypatch.setattr(counting, "_host_or_device", lambda count: count)
    monkeypatch.setattr(
        _native,
        "value_counts",
        lambda x: (torch.count_nonzero(x.bool()), torch.count_nonzero(x == 1)),
    )
