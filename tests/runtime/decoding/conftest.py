"""Every decoder that runs on the CPU, opened the way users open them (runtime.decoding.open)."""
from __future__ import annotations

import pytest

# name -> (target fixture, backend, options)
CPU_DECODERS = {
    "torch": ("tiny_source", "torch", {}),
    "onnxruntime (with past)": ("tiny_past_onnx", "onnxruntime", {}),
    "onnxruntime (plain graph, full recompute)": ("tiny_onnx", "onnxruntime", {}),
    "onnxruntime (static-cache graph file)": ("tiny_static_onnx", "onnxruntime", {}),
    "onnxruntime-static (from weights)": ("tiny_source", "onnxruntime-static", {"max_cache": 96}),
}


@pytest.fixture(params=list(CPU_DECODERS))
def open_cpu_decoder(request):
    """A function rows -> Decoder for each CPU decoder in turn."""
    from runtime.decoding.open import open_decoder

    fixture, backend, options = CPU_DECODERS[request.param]
    target = request.getfixturevalue(fixture)
    return lambda rows: open_decoder(target, backend, rows=rows, **options)


@pytest.fixture
def torch_decoder(tiny_source):
    from runtime.decoding.open import open_decoder

    return lambda rows: open_decoder(tiny_source, "torch", rows=rows, device="cpu")
