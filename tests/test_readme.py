"""The README's Python examples run as written (with the real packaged MiniLM model)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    # A block runs where what it imports is installed (the packaged MiniLM, sentence-transformers, ...).
    for module in re.findall(r"^(?:from|import) (\w+)", BLOCKS[index], flags=re.M):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})


def test_readme_has_the_two_setup_commands():
    text = README.read_text()
    assert 'pip install torch==2.13.0 && pip install -e ".[demo,search]" && m3embed train' in text
    assert "HF_HUB_OFFLINE=1 python -m pytest" in text
    assert "python -m pytest" in (README.parent / ".ci" / "run").read_text()
