"""Backends behind one interface; heavy libraries are imported only when a backend is opened."""
from __future__ import annotations

from pathlib import Path

from .base import Backend, BackendError, TensorMeta

FILE_BACKENDS = ("onnxruntime", "onnxruntime-cuda", "tensorrt")


def open_file_backend(kind: str, path: str | Path) -> Backend:
    """Open a deployed model file (ONNX, or a TensorRT engine) with the named backend."""
    if kind in ("onnxruntime", "onnxruntime-cpu"):
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, provider="cpu")
    if kind == "onnxruntime-cuda":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, provider="cuda")
    if kind == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path)
    raise BackendError(f"unknown backend {kind!r}; choose one of {list(FILE_BACKENDS)}")


__all__ = ["Backend", "BackendError", "TensorMeta", "FILE_BACKENDS", "open_file_backend"]
