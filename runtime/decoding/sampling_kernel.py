"""The sampler's per-step work on CUDA as one Triton kernel: each row's counter-based Gumbel noise,
the top-k filter, the temperature, both argmaxes (greedy and sampled) and the counter's advance.
In PyTorch ops that is about forty launches per step (torch.topk alone cost 0.19 ms of host time
per step on the H200), more than a small model's whole decode step; here it is one.

The filter keeps the logits at or above the row's k-th largest value, as `sampling.choose` does;
the kernel finds that value by bisecting on the logits' order-preserving 32-bit keys (32 counts
over the row), which needs no sort.

The integer hash is `sampling._mix` bit for bit (uint64 arithmetic, masked to 32 bits as the
PyTorch code does), so the uniform noise is identical; only the logarithms come from another math
library, which can move a draw that is within an ulp of a tie. Triton ships with PyTorch's CUDA
wheels; without it (or off CUDA) `fused_choose` returns None and the PyTorch ops run.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def mix(x):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def choose_kernel(logits_ptr, stride, kept_ptr, temperature_ptr, key_ptr, counter_ptr, out_ptr, vocab,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0)
        ids = tl.arange(0, BLOCK)
        inside = ids < vocab
        logits = tl.load(logits_ptr + row * stride + ids, mask=inside, other=float("-inf")).to(tl.float32)
        greedy = tl.argmax(logits, 0, tie_break_left=True)
        temperature = tl.load(temperature_ptr + row)
        counter = tl.load(counter_ptr + row)
        key = tl.load(key_ptr + row).to(tl.uint64)
        key = mix((key + counter.to(tl.uint64) * 0x9E3779B9) & 0xFFFFFFFF)
        bits = mix(mix((key + ids.to(tl.uint64) * 0x85EBCA6B) & 0xFFFFFFFF) ^ key)
        uniform = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        gumbel = -tl.log(-tl.log(uniform))
        # the k-th largest logit's order key: the largest t with at least k keys >= t, bit by bit
        raw = logits.to(tl.uint32, bitcast=True)
        order = tl.where((raw >> 31) != 0, ~raw, raw | 0x80000000).to(tl.uint64)
        kept = tl.load(kept_ptr + row)
        threshold = tl.zeros((), dtype=tl.uint64)
        for bit in tl.static_range(31, -1, -1):
            candidate = threshold | (1 << bit)
            threshold = tl.where(tl.sum((order >= candidate).to(tl.int32), 0) >= kept, candidate, threshold)
        scaled = logits / tl.maximum(temperature, 1e-10) + gumbel
        scaled = tl.where(inside & (order >= threshold), scaled, float("-inf"))
        sampled = tl.argmax(scaled, 0, tie_break_left=True)
        tl.store(out_ptr + row, tl.where(temperature > 0, sampled, greedy).to(tl.int64))
        tl.store(counter_ptr + row, counter + 1)

    return triton, choose_kernel


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
                         rows.counters, out, vocab, BLOCK=triton.next_power_of_2(vocab))
    except Exception as error:  # a Triton that cannot build it: the PyTorch ops give the same tokens
        _kernel.cache_clear()
        globals()["_kernel"] = lambda: None
        warnings.warn(f"the fused sampling kernel failed ({type(error).__name__}: {error}); sampling with PyTorch ops")
        return None
    return out
