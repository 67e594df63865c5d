"""The sampler's per-step work on CUDA as one Triton kernel: each row's counter-based Gumbel noise,
the top-k filter, the temperature, both argmaxes (greedy and sampled) and the counter's advance.
In PyTorch ops that is about forty launches per step (torch.topk alone cost 0.19 ms of host time
per step on the H200), more than a small model's whole decode step; here it is one.

The filter keeps the logits at or above the row's k-th largest value, as `sampling.choose` does;
the kernel finds that value by bisecting on the logits' order-preserving 32-bit keys (32 counts
over the row), which needs no sort.

The integer hash is `sampling._mix` bit for bit (32-bit arithmetic wrapping as the PyTorch code's
masked int64 arithmetic does), so the uniform noise is identical; only the logarithms come from another math
library, which can move a draw that is within an ulp of a tie. Triton ships with PyTorch's CUDA
wheels; without it (or off CUDA) `fused_choose` returns None and the PyTorch ops run.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor


NUM_WARPS = 16  # fewer spill a 32k-token row's keys out of registers in the filter's passes
CHUNK = 4096  # logits per pass of the pick (the noise of a whole row at once spilled)


@functools.cache
def _kernel():
    try:
        import triton

        from .sampling_triton import choose_kernel
    except ImportError:
        return None
    return triton, choose_kernel


def fused_available() -> bool:
    """Whether Triton and the kernel's source import (a kernel that failed to build is then off)."""
    return _kernel() is not None


def fused_choose(logits: Tensor, rows) -> Tensor | None:
    """`choose` for CUDA logits in one launch (rows: sampling.RowSettings); None without Triton."""
    found = _kernel()
    if found is None or logits.stride(-1) != 1:
        return None
    triton, kernel = found
    count, vocab = logits.shape
    out = torch.empty(count, dtype=torch.int64, device=logits.device)
    try:
        kernel[(count,)](logits, logits.stride(0), rows.kept, rows.temperature, rows.keys,
                         rows.counters, out, vocab, BLOCK=triton.next_power_of_2(vocab),
                         CHUNK=min(CHUNK, triton.next_power_of_2(vocab)), num_warps=NUM_WARPS)
    except Exception as error:  # a Triton that cannot build it: the PyTorch ops give the same tokens
        _kernel.cache_clear()
        globals()["_kernel"] = lambda: None
        warnings.warn(f"the fused sampling kernel failed ({type(error).__name__}: {error}); sampling with PyTorch ops")
        return None
    return out
