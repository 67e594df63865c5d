"""The one table of backends: each one's name, what it opens, where it runs and how to open it.

CLI choices, defaults and the device a backend's companions (the PyTorch reference, token
buffers) use all come from here. Adding a backend is one `BackendSpec` row and its module.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from models.graph_metadata import STATIC_CACHE, STATIC_PORTABLE

from .backends.base import Backend, BackendError

WEIGHTS, ONNX, ENGINE = "weights", "onnx", "engine"  # what a backend opens


@dataclass(frozen=True)
class BackendSpec:
    name: str
    opens: str  # WEIGHTS (a PyTorch model), ONNX (a graph file) or ENGINE (a TensorRT plan)
    device: str  # "cpu", "cuda", or "auto" (CUDA when a GPU is visible)
    summary: str
    loader: str  # "module:function" returning a Backend (or a Decoder, see `decoder`); imported only when opened
    decoder: bool = False  # opens a Decoder of its own rather than a Backend
    static_cache: str | None = None  # the static-cache graph kind it runs (from a file, or written from weights)
    benchmarked_on: tuple[str, ...] = ()  # machines ("cpu", "cuda") where `benchmark` runs it by default

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def open(self, target, **options) -> Backend:
        """Open `target` (a ModelSource for WEIGHTS, else a path) with this backend."""
        module, _, function = self.loader.partition(":")
        return getattr(importlib.import_module(module), function)(target, self, **options)


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec("torch", WEIGHTS, "auto", "the PyTorch model (eager; CUDA when a GPU is visible)",
                "runtime.backends.torch_backend:open_torch", benchmarked_on=("cpu", "cuda")),
    BackendSpec("torch-compile", WEIGHTS, "cuda",
                "PyTorch with torch.compile(mode='reduce-overhead', dynamic=True): CUDA graphs re-recorded "
                "as the cache grows", "runtime.backends.torch_backend:open_compiled", benchmarked_on=("cuda",)),
    BackendSpec("torch-compile-static", WEIGHTS, "cuda",
                "gpt-fast's recipe: key/value buffers in the module, fixed shapes, the decode step compiled with "
                "mode='reduce-overhead', fullgraph=True (CUDA graphs), prompts compiled separately",
                "runtime.decoding.torch_static:open_torch_static", decoder=True, benchmarked_on=("cuda",)),
    BackendSpec("triton-fused", WEIGHTS, "cuda",
                "batch 1 only: the decode step as fused Triton kernels (norms folded into the matrix-vector "
                "products, rotary + cache write + attention in one kernel) replayed as one CUDA graph; prompts "
                "through PyTorch", "runtime.decoding.fused_decoder:open_fused", decoder=True),
    BackendSpec("onnxruntime", ONNX, "cpu", "ONNX Runtime, CPU execution provider",
                "runtime.backends.onnxruntime_backend:open_onnxruntime", benchmarked_on=("cpu",)),
    BackendSpec("onnxruntime-cuda", ONNX, "cuda", "ONNX Runtime, CUDA execution provider, IO bound on the GPU",
                "runtime.backends.onnxruntime_backend:open_onnxruntime", benchmarked_on=("cuda",)),
    BackendSpec("onnxruntime-static", WEIGHTS, "cpu",
                "the GroupQueryAttention static-cache graph written from the weights in memory, ONNX Runtime CPU",
                "runtime.decoding.static_cache:open_static_cache", decoder=True, static_cache=STATIC_CACHE),
    BackendSpec("onnxruntime-cuda-static", WEIGHTS, "cuda",
                "the GroupQueryAttention static-cache graph written from the weights in memory, ONNX Runtime CUDA "
                "with CUDA graphs", "runtime.decoding.static_cache:open_static_cache", decoder=True,
                static_cache=STATIC_CACHE, benchmarked_on=("cuda",)),
    BackendSpec("onnxruntime-static-portable", WEIGHTS, "cpu",
                "the standard-ops static-cache graph exported from the weights in memory, ONNX Runtime CPU",
                "runtime.decoding.static_cache:open_static_cache", decoder=True, static_cache=STATIC_PORTABLE),
    BackendSpec("onnxruntime-cuda-static-portable", WEIGHTS, "cuda",
                "the standard-ops static-cache graph exported from the weights in memory, ONNX Runtime CUDA with "
                "CUDA graphs", "runtime.decoding.static_cache:open_static_cache", decoder=True,
                static_cache=STATIC_PORTABLE, benchmarked_on=("cuda",)),
    BackendSpec("tensorrt", ENGINE, "cuda", "a TensorRT or TensorRT-RTX engine built by build-engine",
                "runtime.backends.tensorrt_backend:open_tensorrt", benchmarked_on=("cuda",)),
)}
AUTO = "auto"
ENGINE_SUFFIXES = (".engine", ".plan")


def backend_spec(name: str) -> BackendSpec:
    try:
        return BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}") from None


def backend_names(opens: tuple[str, ...] = (WEIGHTS, ONNX, ENGINE), decoder: bool | None = None) -> list[str]:
    """Names of the backends that open any of `opens` (and, if given, that open decoders or Backends)."""
    return [spec.name for spec in BACKENDS.values()
            if spec.opens in opens and (decoder is None or spec.decoder == decoder)]


def default_backends(cuda: bool, have: tuple[str, ...] = (WEIGHTS, ONNX)) -> list[str]:
    """What `benchmark` compares when no --backend is given, among backends opening what it `have`s."""
    machine = "cuda" if cuda else "cpu"
    return [spec.name for spec in BACKENDS.values() if machine in spec.benchmarked_on and spec.opens in have]


def check_runnable(spec: BackendSpec) -> None:
    """Refuse, before any work, a CUDA backend on a machine where PyTorch sees no GPU (every CUDA
    backend keeps its buffers in PyTorch's CUDA tensors)."""
    if spec.device != "cuda":
        return
    import torch

    if torch.cuda.is_available():
        return
    twin = next((s.name for s in BACKENDS.values() if s.device != "cuda" and s.opens == spec.opens
                 and s.static_cache == spec.static_cache), None)
    raise BackendError(f"the {spec.name} backend runs on a CUDA GPU, and this machine has none that PyTorch can see; "
                       f"run it on a GPU machine{f', or use --backend {twin} here' if twin else ''}")


def onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend(name: str, path: str | Path | None) -> BackendSpec:
    """`auto`: engines run on TensorRT; ONNX graphs on ONNX Runtime (CUDA if this build has it)."""
    if name != AUTO:
        return backend_spec(name)
    if path is not None and Path(path).suffix in ENGINE_SUFFIXES:
        return BACKENDS["tensorrt"]
    return BACKENDS["onnxruntime-cuda" if onnxruntime_has_cuda() else "onnxruntime"]


def backend_on(device: str, path: str | Path) -> BackendSpec:
    """The backend that runs a model file on `device`: "auto" (as resolve_backend), "cpu" or "cuda"."""
    if device == AUTO:
        return resolve_backend(AUTO, path)
    opens = ENGINE if Path(path).suffix in ENGINE_SUFFIXES else ONNX
    spec = next((s for s in BACKENDS.values() if s.opens == opens and s.device == device and not s.decoder), None)
    if spec is None:
        raise BackendError(f"no backend runs {'an engine' if opens == ENGINE else 'an ONNX graph'} on {device!r}; "
                           "use auto, cpu or cuda (engines: cuda)")
    return spec


def static_cache_twin(spec: BackendSpec, kind: str) -> BackendSpec:
    """The backend that runs a static-cache graph of `kind` on the same device as `spec`."""
    if spec.static_cache == kind:
        return spec
    twin = next((s for s in BACKENDS.values() if s.static_cache == kind and s.device == spec.device), None)
    if twin is None or spec.opens != ONNX:
        raise BackendError(f"static-cache graphs run on ONNX Runtime; {spec.name} cannot run one (use "
                           f"{' or '.join(n for n, s in BACKENDS.items() if s.opens == ONNX)})")
    return twin


def open_backend(name: str, target, **options) -> Backend:
    """Open `target` with the named backend (or `auto`), as a Backend."""
    spec = resolve_backend(name, None if is_weights(target) else target)
    if spec.decoder:
        raise BackendError(f"{spec.name} runs as a decoder, not a Backend; open it with open_decoder")
    if spec.opens == WEIGHTS and not is_weights(target):
        raise BackendError(f"the {spec.name} backend runs PyTorch weights, not a file ({target})")
    if spec.opens != WEIGHTS and is_weights(target):
        raise BackendError(f"the {spec.name} backend needs {'an engine' if spec.opens == ENGINE else 'an ONNX graph'}")
    return spec.open(target, **options)


def is_weights(target) -> bool:
    """Whether `target` is PyTorch weights (a ModelSource) rather than a graph or an engine."""
    from models.source import is_weights as weights

    return weights(target)
