"""Open a deployed model (ONNX or engine) or the PyTorch model behind the Backend interface."""
from __future__ import annotations

from pathlib import Path

from models.errors import ToolkitError

from .backends import Backend, open_file_backend

BACKEND_CHOICES = ("auto", "torch", "onnxruntime", "onnxruntime-cuda", "tensorrt")


def default_backend_for(path: Path) -> str:
    """Engines run on TensorRT; ONNX graphs on ONNX Runtime (CUDA if this build has it)."""
    if path.suffix in (".engine", ".plan"):
        return "tensorrt"
    try:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            import torch

            if torch.cuda.is_available():
                return "onnxruntime-cuda"
    except ImportError:
        pass
    return "onnxruntime"


def open_model(model: str | None, backend: str, torch_source=None, with_past: bool = True) -> Backend:
    """`torch` runs `torch_source()` (a ModelSource factory); other backends open `model`."""
    if backend == "torch":
        from .backends.torch_backend import TorchBackend

        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchBackend(torch_source().model, device=device, with_past=with_past)
    if model is None:
        raise ToolkitError(f"--model is required for the {backend} backend (an .onnx graph or an .engine)")
    path = Path(model)
    if not path.is_file():
        raise ToolkitError(f"model not found: {path}")
    return open_file_backend(default_backend_for(path) if backend == "auto" else backend, path)
