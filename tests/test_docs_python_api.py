"""The examples of docs/python-api.md run as written: every ```python block, in order, in one
namespace, in a fresh folder, on the CPU (the `tiny` preset)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks() -> list[str]:
    return BLOCK.findall((ROOT / "docs" / "python-api.md").read_text())


def test_python_api_examples_run(tmp_path, monkeypatch):
    found = blocks()
    assert len(found) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_python_api"}
    out = io.StringIO()
    for number, code in enumerate(found, 1):
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"docs/python-api.md block {number}", "exec"), namespace)
    assert (tmp_path / "model-past.onnx").is_file()
    assert "[1, 2] {2: 6, 1: 4}" in out.getvalue()
    assert "parity passed" in out.getvalue()
