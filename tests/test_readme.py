"""Every ```python example in README.md runs as written."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def examples():
    text = README.read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    # name each example after the heading above it, for readable test ids
    out = []
    for block in blocks:
        pos = text.index(block)
        headings = re.findall(r"^#+ (.+)$", text[:pos], flags=re.M)
        out.append(pytest.param(block, id=f"{len(out):02d}-{headings[-1] if headings else 'top'}"[:60]))
    return out


def test_readme_has_examples():
    assert len(examples()) >= 20


@pytest.mark.parametrize("code", examples())
def test_readme_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
