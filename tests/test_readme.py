"""The README and the docs' Markdown pages stay true: their Python examples run, and CI runs
the README's test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def _readme():
    return (ROOT / "README.md").read_text()


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_has_a_python_example():
    assert _python_blocks(ROOT / "README.md"), "README has no python example"


@pytest.mark.parametrize(
    "page", [p for p in PAGES if _python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT))
)
def test_python_examples_run(page):
    for block in _python_blocks(page):
        exec(compile(block, str(page.relative_to(ROOT)), "exec"), {})


def test_ci_runs_the_readme_test_command():
    quickstart = _readme().split("## Quickstart", 1)[1].split("##", 1)[0]
    commands = [
        line.strip()
        for line in quickstart.splitlines()
        if line.strip() and not line.startswith(("#", "```", "  "))
    ]
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
