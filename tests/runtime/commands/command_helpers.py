"""What the command tests share: the one-line error check and a graph whose weights were changed."""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import numpy_helper


def assert_one_line_error(capsys, prog: str, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"{prog}: error:"), lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def perturb_embedding(proto, delta: float = 0.05) -> int:
    """Shift the graph's token embedding initializer in place; returns how many were changed."""
    changed = 0
    for init in proto.graph.initializer:
        if init.name.endswith("token_emb.weight"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + delta, init.name))
            changed += 1
    return changed


def tampered_copy(graph: Path, target: Path) -> Path:
    """`graph` saved to `target` with its token embedding shifted (same recorded weights sha)."""
    proto = onnx.load(str(graph))
    assert perturb_embedding(proto) == 1
    onnx.save(proto, str(target))
    return target
