"""A plain matrix-vector product (one row of activations, M = 1) through triton-fused's product kernel
(runtime/decoding/fused_triton.py) with its norm and epilogues off: what `scripts/hbm_bandwidth.py
--triton` times against PyTorch's cuBLAS choices on a preset's shapes.

Each program reduces BLOCK_N rows of the weight (row-major [N, K], as nn.Linear holds it) against
the vector, BLOCK_K columns a pass, in float32; the weight is read once, the vector from cache.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runtime.decoding.fused_decoder import GemvConfig, launch_gemv

# what scripts/hbm_bandwidth.py times on each shape (it keeps the fastest)
CONFIGS = [GemvConfig(n, k, warps, stages)
           for n, k in ((2, 1024), (4, 512), (4, 1024), (8, 256), (8, 512), (16, 256), (32, 128))
           for warps in (4, 8) for stages in (2, 4)]


def gemv(weight: Tensor, vector: Tensor, config: GemvConfig = CONFIGS[4], out: Tensor | None = None) -> Tensor:
    """weight [N, K] @ vector [K] (or [1, K]) -> [N] (or [1, N]), in the weight's dtype."""
    n, k = weight.shape
    if vector.numel() != k or vector.shape[-1] != k or weight.stride(1) != 1 or not vector.is_contiguous():
        raise ValueError(f"gemv takes a row-major [N, K] weight and a contiguous vector of K values; "
                         f"got {tuple(weight.shape)} (strides {weight.stride()}) and {tuple(vector.shape)}")
    shape = vector.shape[:-1] + (n,)
    if out is None:
        out = torch.empty(shape, dtype=weight.dtype, device=weight.device)
    elif out.shape != shape or out.dtype != weight.dtype or out.device != weight.device or not out.is_contiguous():
        raise ValueError(f"gemv's out must be a contiguous {tuple(shape)} {weight.dtype} tensor on {weight.device}; "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    launch_gemv(weight, vector, out, config)
    return out
