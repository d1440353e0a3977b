"""Fixtures shared across the test suite: factories, so every test builds its own objects
(no state is shared between tests)."""

import pytest
import tiny
import torch


@pytest.fixture
def tiny_snn():
    """``tiny_snn(**kwargs)``: a :class:`tiny.TinySNN` (Linear -> LIF -> Linear)."""
    return tiny.TinySNN


@pytest.fixture
def two_class_data():
    """``two_class_data(n=72, seed=0, encoding="rate")``: an easy two-class dataset."""
    return tiny.two_class_data


@pytest.fixture
def tiny_moe():
    """``tiny_moe(seed=0, **overrides)``: a one-layer spiking MoE classifier (8 -> 2 classes)."""
    return tiny.tiny_moe


@pytest.fixture
def train_config():
    """``train_config(**overrides)``: a short CPU TrainConfig for tests."""
    return tiny.train_config


@pytest.fixture
def one_thread():
    """Run the test on one torch thread, then restore the setting: tiny tensors run fastest
    on one thread (two spin against each other on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
