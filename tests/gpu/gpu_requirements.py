"""What the GPU tests need besides a CUDA GPU, and how they react when it is missing.

Without CUDA every GPU test is skipped (this is not the machine for them). With CUDA, a missing
library is a failure that names the wheel to stage, never a skip: otherwise `make test-gpu` on a
machine where staging went wrong would report everything skipped and exit 0. Only what cannot run
on this GPU at all (TensorRT-RTX engines on compute capability 9.0) skips, with its reason.
"""
from __future__ import annotations

import pytest

STAGE = "stage the GPU wheels first (../shared/gpu/gpu-wheels, see docs: 'Verifying on a GPU')"


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return onnxruntime.get_available_providers()


def require_onnxruntime_cuda(cuda: bool, providers: list[str]) -> None:
    """Fail (with CUDA) or skip (without) unless ONNX Runtime has its CUDA provider."""
    if not cuda:
        pytest.skip("needs a CUDA GPU")
    if "CUDAExecutionProvider" not in providers:
        pytest.fail(f"CUDA is present but onnxruntime has no CUDAExecutionProvider (providers: {providers}); "
                    f"install onnxruntime-gpu==1.31.1: {STAGE}", pytrace=False)


def require_tensorrt(cuda: bool, load):
    """The TensorRT library `load()` returns, or a failure naming the wheels (with CUDA)."""
    from runtime.tensorrt.library import TensorRTUnavailable

    if not cuda:
        pytest.skip("needs a CUDA GPU")
    try:
        return load()
    except TensorRTUnavailable as error:
        pytest.fail(f"CUDA is present but no TensorRT library loads ({error}); install tensorrt-rtx-cu13==1.7.1.116 "
                    f"with its -libs and -bindings wheels (or NVIDIA's tensorrt): {STAGE}", pytrace=False)
