"""CPU checks of how the GPU tests react to a missing library: fail with CUDA, skip without."""
from __future__ import annotations

import pytest

from gpu_requirements import require_onnxruntime_cuda, require_tensorrt


def test_cuda_without_onnxruntime_gpu_fails_naming_the_wheel():
    with pytest.raises(pytest.fail.Exception, match="install onnxruntime-gpu==1.31.1"):
        require_onnxruntime_cuda(True, ["CPUExecutionProvider"])
    require_onnxruntime_cuda(True, ["CUDAExecutionProvider", "CPUExecutionProvider"])  # present: nothing raised


def test_no_cuda_skips():
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA GPU"):
        require_onnxruntime_cuda(False, [])
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA GPU"):
        require_tensorrt(False, lambda: None)


def test_cuda_without_tensorrt_fails_naming_the_wheels():
    from runtime.tensorrt.library import TensorRTUnavailable

    def missing():
        raise TensorRTUnavailable("no module named tensorrt_rtx")

    with pytest.raises(pytest.fail.Exception, match="tensorrt-rtx-cu13==1.7.1.116"):
        require_tensorrt(True, missing)
    assert require_tensorrt(True, lambda: "library") == "library"
