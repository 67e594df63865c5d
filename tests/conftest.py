"""Session fixtures shared by the CPU suite.

ONNX exports take several seconds each, so the tiny preset and the upstream checkpoint are
exported once per session and reused; tests must treat the fixtures as read-only.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))

from models.presets import preset  # noqa: E402
from models.source import ModelSource, weights_sha256  # noqa: E402
from models.transformer import build_model  # noqa: E402

# A small upstream (native-sparse-attention-pytorch) dense Transformer: GQA with 2 groups.
UPSTREAM_KWARGS = dict(num_tokens=64, dim=32, depth=2, dim_head=8, heads=4, kv_heads=2)
TINY_SEED = 0


def _quiet(*_args, **_kwargs) -> None:
    pass


def upstream_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Reference logits of an upstream dense Transformer, composed from its modules
    (its own forward passes cache arguments that its dense Attention does not accept)."""
    with torch.no_grad():
        x = model.token_emb(ids)
        for attn, ff in model.layers:
            x = attn(x) + x
            x = ff(x) + x
        return model.to_logits(model.norm(x))


@pytest.fixture(scope="session")
def upstream_reference():
    """The function computing upstream reference logits (see upstream_logits)."""
    return upstream_logits


@pytest.fixture(scope="session")
def tiny_config():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return build_model(tiny_config, seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_source(tiny_model):
    """What models.source.resolve_model(preset_name='tiny', seed=0) describes, built by hand."""
    return ModelSource.of_model(tiny_model, f"preset tiny (seed {TINY_SEED})", weights_sha256(tiny_model),
                       preset="tiny", seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_model, tiny_source) -> Path:
    """The tiny preset exported once: fp32, opset 17, no verification callback."""
    from export.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("tiny_export") / "model.onnx"
    result = export_onnx(tiny_model, path, opset=17, precision="fp32", weights=tiny_source.record, log=_quiet)
    assert result.path == path and path.is_file()
    return path


@pytest.fixture(scope="session")
def tiny_export_example_sequence(tiny_config) -> int:
    """The export's trace length, re-derived here: 37, or the next prime no config dimension equals."""
    c = tiny_config
    taken = {c.num_tokens, c.dim, c.depth, c.dim_head, c.heads, c.kv_heads, c.ff_hidden, c.dim_inner,
             c.dim_kv_inner}
    size = 37
    while size in taken or any(size % p == 0 for p in range(2, int(size**0.5) + 1)):
        size += 1
    return size


@pytest.fixture(scope="session")
def upstream_model():
    from native_sparse_attention_pytorch.transformer import Transformer as UpstreamTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = UpstreamTransformer(**UPSTREAM_KWARGS, use_sparse_attn=False)
        # RMSNorm weights start at one; randomise them so a dropped norm weight cannot go unnoticed
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".1.0.weight"):
                    param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="session")
def upstream_checkpoint(tmp_path_factory, upstream_model) -> Path:
    path = tmp_path_factory.mktemp("upstream") / "upstream.pt"
    torch.save(upstream_model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def upstream_onnx(tmp_path_factory, upstream_checkpoint) -> tuple[Path, object]:
    """(path, project model) for the upstream checkpoint exported at opset 17."""
    from export.onnx_export import export_onnx
    from models.source import resolve_model

    source = resolve_model(checkpoint=str(upstream_checkpoint))
    path = tmp_path_factory.mktemp("upstream_export") / "upstream.onnx"
    export_onnx(source.model, path, opset=17, weights=source.record, log=_quiet)
    return path, source.model


@pytest.fixture(scope="session")
def tiny_static_graph(tmp_path_factory, tiny_model, tiny_source):
    """write(cache) -> the tiny preset written as an fp32 static-cache graph of `cache` tokens."""
    from export.static_cache_graph import export_static_cache

    def write(cache: int) -> Path:
        path = tmp_path_factory.mktemp(f"tiny_static_{cache}") / f"model-static-{cache}.onnx"
        export_static_cache(tiny_model, path, cache, "fp32", tiny_source.record, log=_quiet)
        return path

    return write


@pytest.fixture(scope="session")
def tiny_static_onnx(tiny_static_graph) -> Path:
    """The tiny preset as an fp32 static-cache graph with a 96-token cache."""
    return tiny_static_graph(96)


@pytest.fixture(scope="session")
def tiny_portable_static_onnx(tmp_path_factory, tiny_model, tiny_source) -> Path:
    """The tiny preset as the standard-ops static-cache graph (fp32, 96-token window)."""
    from export.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("tiny_portable_static") / "model-static-portable.onnx"
    export_onnx(tiny_model, path, weights=tiny_source.record, static_cache=96, log=lambda _: None)
    return path


@pytest.fixture(scope="session")
def tiny_int4_export(tmp_path_factory) -> tuple[Path, dict]:
    """(graph, export report): the tiny preset with past, int4 weights in blocks of 32 (fp32
    activations, opset 21), exported and verified through the export-model command line."""
    import json

    from runtime.commands import export_model as export_cli

    folder = tmp_path_factory.mktemp("tiny_int4")
    path, report = folder / "model-int4.onnx", folder / "export.json"
    code = export_cli.main(["--quantize", "int4", "--with-past", "--output", str(path), "--json", str(report)])
    assert code == 0
    return path, json.loads(report.read_text())


def _engine_run(decoder, work, overlap: bool = False) -> list[list[int]]:
    """Every (prompt, settings) request through one engine (4 prompt tokens a step, so requests
    join as rows free up): each request's tokens; no request may fail."""
    from runtime.decoding.engine import Engine

    engine, tokens = Engine(decoder, prefill_tokens=4, overlap=overlap), {}
    handles = [engine.submit(prompt, settings) for prompt, settings in work]
    while not engine.idle:
        for event in engine.step():
            assert event.token is not None, event.error
            tokens.setdefault(event.request, []).append(event.token)
    return [tokens[h] for h in handles]


def _engine_loops(decoder, requests):
    """The requests with every other one stopping at an end-of-sequence token midway (picked from
    its unstopped run), then (requests, plain loop's tokens, overlapped loop's, each request alone)."""
    import dataclasses

    unstopped = _engine_run(decoder, requests)
    requests = [(prompt, dataclasses.replace(settings, eos_id=unstopped[i][len(unstopped[i]) // 2])
                 if i % 2 == 0 else settings) for i, (prompt, settings) in enumerate(requests)]
    plain, overlapped = _engine_run(decoder, requests), _engine_run(decoder, requests, overlap=True)
    return requests, plain, overlapped, [_engine_run(decoder, [request])[0] for request in requests]


@pytest.fixture
def engine_loops():
    """A function (decoder, requests) -> (requests with EOS stops, plain, overlapped, alone tokens)."""
    return _engine_loops
