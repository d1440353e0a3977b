"""Docstring examples run (STYLE: examples that run)."""

import doctest
import importlib

import pytest

MODULES = [
    "spiking_moe.functional.surrogate",
    "spiking_moe.functional.lif",
    "spiking_moe.neurons",
    "spiking_moe.encoding",
    "spiking_moe.data",
    "spiking_moe.config",
    "spiking_moe.training",
    "spiking_moe.experts",
    "spiking_moe.router",
    "spiking_moe.moe",
    "spiking_moe.models",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    globs = {"torch": importlib.import_module("torch"), **vars(module)}
    result = doctest.testmod(module, globs=globs, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
