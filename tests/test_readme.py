"""The Python examples of README.md and docs/*.md run as written (with the real packaged MiniLM model)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# (page, index of the block in the page, the block's code) for every ```python block of every page.
BLOCKS = [
    (page, index, block)
    for page in PAGES
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]


@pytest.mark.parametrize(
    ("page", "index", "block"),
    BLOCKS,
    ids=[f"{page.relative_to(ROOT)}:{index}" for page, index, _ in BLOCKS],
)
def test_python_example_runs(page, index, block, tmp_path, monkeypatch):
    # A block runs where what it imports is installed (the packaged MiniLM, sentence-transformers, ...).
    for module in re.findall(r"^(?:from|import) (\w+)", block, flags=re.M):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"{page.relative_to(ROOT)} python block {index}", "exec"), {})


def test_examples_are_found_where_they_live():
    # The README keeps short examples; the full ones moved to docs/usage.md (issue 18).
    pages = {page.relative_to(ROOT).as_posix() for page, _, _ in BLOCKS}
    assert {"README.md", "docs/usage.md"} <= pages


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[demo,search]" && m3embed train' in text
    assert "HF_HUB_OFFLINE=1 python -m pytest" in text
    assert "python -m pytest" in (README.parent / ".ci" / "run").read_text()
