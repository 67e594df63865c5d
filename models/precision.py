"""The one table of precisions: dtype spellings, bytes per value, tolerance rows and what
TensorRT's strong typing accepts. Every other module looks a precision up here.

A weight-only quantized graph is one more row: its activations and cache keep a float
dtype (`dtype`), its matrix weights take `weight_bytes` each.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ToolkitError


class PrecisionError(ToolkitError, ValueError):
    """An unknown precision name."""


@dataclass(frozen=True)
class Tolerance:
    """A case passes when max_abs <= atol + rtol * max|reference|, cosine >= min_cosine
    and top-1 agreement over the sweep >= min_top1."""

    atol: float
    rtol: float
    min_cosine: float
    min_top1: float


@dataclass(frozen=True)
class Precision:
    name: str  # the command-line spelling: fp32, fp16, bf16
    dtype: str  # the numpy / metadata spelling of activations and cache: float32, float16, bfloat16
    torch_dtype: torch.dtype
    onnx_type: int  # onnx.TensorProto data type
    bytes_per_value: int  # activations and key/value cache
    weight_bytes: float  # matrix weights (differs from bytes_per_value only for quantized rows)
    tolerance: Tolerance
    tensorrt_type: str  # the tensorrt.DataType member a strongly typed network uses for it
    tensor_cores: bool  # prefill floor: half-precision tensor-core peak, else FP32 peak
    static_cache: bool  # the GroupQueryAttention graph can be written in it
    cpu_note: str | None = None  # why ONNX Runtime's CPU provider cannot run it, if it cannot

    @property
    def numpy_dtype(self) -> np.dtype | None:
        """numpy's dtype, or None where numpy has none (bfloat16)."""
        return None if self.dtype == "bfloat16" else np.dtype(self.dtype)

    @property
    def half(self) -> bool:
        return self.bytes_per_value == 2

    @property
    def exact_tokens(self) -> bool:
        """Greedy tokens must equal the reference's; half precision may flip near-ties and is
        judged by teacher-forced top-1 instead."""
        return not self.half


# fp32 is strict; the half-precision rows allow for 10-bit (fp16) or 7-bit (bf16) mantissas
# through every layer.
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32", torch.float32, 1, 4, 4, Tolerance(1e-4, 0.0, 0.99999, 0.99), "FLOAT",
              tensor_cores=False, static_cache=True),
    Precision("fp16", "float16", torch.float16, 10, 2, 2, Tolerance(5e-2, 1e-2, 0.999, 0.99), "HALF",
              tensor_cores=True, static_cache=True),
    Precision("bf16", "bfloat16", torch.bfloat16, 16, 2, 2, Tolerance(2e-1, 5e-2, 0.995, 0.97), "BF16",
              tensor_cores=True, static_cache=False,
              cpu_note="ONNX Runtime's CPU provider cannot run bfloat16 MatMul; verify on a GPU with "
                       "check-parity --backend onnxruntime-cuda"),
)}
DEFAULT_PRECISION = "fp32"


def precision(name: str) -> Precision:
    """Look a precision up by either spelling ("fp16" or "float16")."""
    for row in PRECISIONS.values():
        if name in (row.name, row.dtype):
            return row
    raise PrecisionError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")


def precision_of_torch(dtype: torch.dtype) -> Precision:
    return next(row for row in PRECISIONS.values() if row.torch_dtype == dtype)
