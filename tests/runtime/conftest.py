"""Exports with a key/value cache and static-cache graphs, shared by the runtime tests."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_past_onnx(tmp_path_factory, tiny_model, tiny_source) -> Path:
    from export.onnx_export import export_onnx
    from runtime.verify.exported import verify_export

    path = tmp_path_factory.mktemp("tiny_past") / "model-past.onnx"
    export_onnx(tiny_model, path, weights=tiny_source.record, with_past=True, log=lambda _: None,
                verify=lambda p: verify_export(p, tiny_model, log=lambda _: None, with_past=True))
    return path


@pytest.fixture(scope="session")
def upstream_past_onnx(tmp_path_factory, upstream_checkpoint) -> tuple[Path, object]:
    from export.onnx_export import export_onnx
    from models.source import resolve_model

    source = resolve_model(checkpoint=str(upstream_checkpoint))
    path = tmp_path_factory.mktemp("upstream_past") / "upstream-past.onnx"
    export_onnx(source.model, path, weights=source.record, with_past=True, log=lambda _: None)
    return path, source.model


# --- serving: one real Triton server for the session ------------------------------------------


@pytest.fixture(scope="session")
def serving_graph(tiny_static_graph) -> Path:
    """The tiny preset as an fp32 static-cache graph deep enough for long streams (cancellation tests)."""
    return tiny_static_graph(512)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, serving_graph):
    """One real server for the session: `serve` on the 512-token static-cache graph (ONNX Runtime CPU),
    with two generate instances, so every server test also covers requests spread over processes."""
    from triton_process import ServeProcess

    server = ServeProcess(serving_graph, tmp_path_factory.mktemp("triton"), ["--generate-instances", "2"])
    yield server
    if server.process.poll() is None:
        assert server.terminate() == 0, server.log.read_text()[-2000:]
    assert server.leftovers() == ([], [])
