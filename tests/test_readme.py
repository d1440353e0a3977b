"""The README stays true: its Python examples run and CI runs its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme():
    return (ROOT / "README.md").read_text()


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", _readme(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    quickstart = _readme().split("## Quickstart", 1)[1].split("##", 1)[0]
    commands = [
        line.strip()
        for line in quickstart.splitlines()
        if line.strip() and not line.startswith(("#", "```", "  "))
    ]
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
