"""A matrix-vector product (one row of activations, M = 1) as a Triton kernel, the candidate for a
batch-1 decode step near copy speed. Not used by any decoder yet: `scripts/hbm_bandwidth.py`
measures it against PyTorch's cuBLAS choices on the 7b step's shapes, and it earns a place in a
decoder only if it is faster there.

Each program reduces BLOCK_N rows of the weight (row-major [N, K], as nn.Linear holds it) against
the vector, BLOCK_K columns a pass, in float32; the weight is read once, the vector from cache.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# what scripts/hbm_bandwidth.py times on each shape (it keeps the fastest)
CONFIGS = [GemvConfig(n, k, warps, stages)
           for n, k in ((2, 1024), (4, 512), (4, 1024), (8, 256), (8, 512), (16, 256), (32, 128))
           for warps in (4, 8) for stages in (2, 4)]


@functools.cache
def _kernel():
    import triton

    from .gemv_triton import gemv_kernel

    return triton, gemv_kernel


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
    triton, kernel = _kernel()
    kernel[(triton.cdiv(n, config.block_n),)](weight, vector, out, n, k, weight.stride(0),
                                               BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                                               num_warps=config.num_warps, num_stages=config.num_stages)
    return out
