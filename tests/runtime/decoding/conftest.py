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
    "onnxruntime (portable static-cache graph, bound in place)": ("tiny_portable_static_onnx", "onnxruntime", {}),
}


def _portable_static_over_a_backend(path, rows):
    """The path TensorRT engines of the portable static graph take: buffers fed to a Backend and
    copied back (here ONNX Runtime CPU stands in for the engine)."""
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from runtime.decoding.static_cache import StaticCacheDecoder

    backend = OnnxRuntimeBackend(path)
    decoder = StaticCacheDecoder(backend, rows)
    decoder.owner = backend
    return decoder


def _torch_static_eager(source, rows):
    """torch-compile-static's math without torch.compile (which needs a GPU for its CUDA graphs)."""
    from runtime.decoding.torch_static import TorchStaticDecoder

    return TorchStaticDecoder(source.model, rows, 96, "cpu", compile=False)


# name -> (target fixture, function (target, rows) -> Decoder)
CPU_DECODER_FACTORIES = {
    "portable static-cache graph over a Backend": ("tiny_portable_static_onnx", _portable_static_over_a_backend),
    "torch static cache (eager)": ("tiny_source", _torch_static_eager),
}


@pytest.fixture(params=list(CPU_DECODERS) + list(CPU_DECODER_FACTORIES))
def open_cpu_decoder(request):
    """A function rows -> Decoder for each CPU decoder in turn."""
    from runtime.decoding.open import open_decoder

    if request.param in CPU_DECODER_FACTORIES:
        fixture, factory = CPU_DECODER_FACTORIES[request.param]
        target = request.getfixturevalue(fixture)
        return lambda rows: factory(target, rows)
    from runtime.commands.targets import decoder_target

    fixture, backend, options = CPU_DECODERS[request.param]
    target = decoder_target(request.getfixturevalue(fixture), backend, options.get("max_cache"))
    return lambda rows: open_decoder(target, backend, rows=rows, **options)


@pytest.fixture
def torch_decoder(tiny_source):
    from runtime.decoding.open import open_decoder

    return lambda rows: open_decoder(tiny_source, "torch", rows=rows, device="cpu")
