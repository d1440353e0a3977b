"""Docstring examples of the energy package run."""

import doctest
import importlib

import pytest

MODULES = ["energy", "energy.counting", "energy.profiles", "energy.report"]


@pytest.mark.parametrize("name", MODULES)
def test_energy_docstring_examples_run(name):
    module = importlib.import_module(name)
    globs = {"torch": importlib.import_module("torch"), **vars(module)}
    result = doctest.testmod(module, globs=globs, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
