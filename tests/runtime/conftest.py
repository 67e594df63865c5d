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


SERVING_CACHE = 16384  # tokens per row: room for SERVER_LIMITS' 16000-token streams (over ten seconds of decoding)
SHARPEN_QK, SHARPEN_LOGITS = 3.0, 4.0


@pytest.fixture(scope="session")
def serving_model(tiny_model):
    """What the session's server serves: the tiny preset (seed 0) with its attention made to matter,
    query and key projections x3 (attention logits x9) and the logits head x4. Freshly initialised,
    the tiny model attends almost uniformly: an attention scale 15 % off in the served graph moved
    its greedy tokens for 1 prompt in 8 (32 tokens each); this model's move for 7 in 8, and its
    top-2 logit margins on the serving tests' greedy prompts stay above 6e-4, far above float32
    rounding (about 1e-5 on these logits)."""
    import copy

    import torch

    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for layer in model.layers:
            attn = layer.attn
            attn.to_qkv.weight[:(attn.heads + attn.kv_heads) * attn.dim_head] *= SHARPEN_QK
        model.to_logits.weight *= SHARPEN_LOGITS
    return model.eval()


@pytest.fixture(scope="session")
def serving_graph(tmp_path_factory, serving_model) -> Path:
    """serving_model as an fp32 static-cache graph deep enough for long streams (cancellation tests)."""
    from export.static_cache_graph import export_static_cache
    from models.graph_metadata import WeightsRecord
    from models.source import weights_sha256

    path = tmp_path_factory.mktemp("serving") / f"model-static-{SERVING_CACHE}.onnx"
    record = WeightsRecord("preset tiny (seed 0), attention sharpened (tests/runtime/conftest.py)",
                           weights_sha256(serving_model))
    export_static_cache(serving_model, path, SERVING_CACHE, "fp32", record, log=lambda _: None)
    return path


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, serving_graph):
    """One real server for the session: `serve` on serving_graph (ONNX Runtime CPU),
    with two generate instances and two OpenAI API workers, so every server test also covers requests
    spread over processes."""
    from triton_process import ServeProcess

    server = ServeProcess(serving_graph, tmp_path_factory.mktemp("triton"),
                          ["--generate-instances", "2", "--openai-workers", "2"])
    yield server
    if server.process.poll() is None:
        # every test's streams ended or were cancelled: a row or queue entry left now is a leak
        assert server.settled(), f"rows or queued requests left after the tests: {server.load()}"
        code = server.terminate()
        assert code == 0, (f"serve exited with {code}:\n{server.log.read_text()[-2000:]}\n"
                           f"tritonserver.log ends:\n{server.triton_log.read_text(errors='replace')[-3000:]}")
    assert server.leftovers() == ([], [])
