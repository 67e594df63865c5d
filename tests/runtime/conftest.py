"""Exports with a key/value cache, shared by the generation and benchmark tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_past_onnx(tmp_path_factory, tiny_model, tiny_source) -> Path:
    from export.onnx_export import export_onnx
    from export.verify import verify_export

    path = tmp_path_factory.mktemp("tiny_past") / "model-past.onnx"
    export_onnx(tiny_model, path, source=tiny_source.metadata(), with_past=True, log=lambda _: None,
                verify=lambda p: verify_export(p, tiny_model, "float32", log=lambda _: None, with_past=True))
    return path


@pytest.fixture(scope="session")
def upstream_past_onnx(tmp_path_factory, upstream_checkpoint) -> tuple[Path, object]:
    from export.onnx_export import export_onnx
    from models.source import resolve_model

    source = resolve_model(checkpoint=str(upstream_checkpoint))
    path = tmp_path_factory.mktemp("upstream_past") / "upstream-past.onnx"
    export_onnx(source.model, path, source=source.metadata(), with_past=True, log=lambda _: None)
    return path, source.model
