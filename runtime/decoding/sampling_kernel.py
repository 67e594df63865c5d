"""The sampler's per-step work on CUDA as one Triton kernel: each row's counter-based Gumbel noise,
the top-k filter (against a threshold from torch.topk), the temperature, both argmaxes (greedy and
sampled) and the counter's advance. In PyTorch ops that is about forty launches per step, which
cost more host time than a small model's whole decode step; here it is one.

The integer hash is `sampling._mix` bit for bit (uint64 arithmetic, masked to 32 bits as the
PyTorch code does), so the uniform noise is identical; only the logarithms come from another math
library, which can move a draw that is within an ulp of a tie. Triton ships with PyTorch's CUDA
wheels; without it (or off CUDA) `fused_choose` returns None and the PyTorch ops run.
"""
from __future__ import annotations

import functools

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
    def choose_kernel(logits_ptr, stride, threshold_ptr, temperature_ptr, key_ptr, counter_ptr, out_ptr, vocab,
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
        threshold = tl.load(threshold_ptr + row).to(tl.float32)
        scaled = logits / tl.maximum(temperature, 1e-10) + gumbel
        scaled = tl.where(inside & (logits >= threshold), scaled, float("-inf"))
        sampled = tl.argmax(scaled, 0, tie_break_left=True)
        tl.store(out_ptr + row, tl.where(temperature > 0, sampled, greedy).to(tl.int64))
        tl.store(counter_ptr + row, counter + 1)

    return triton, choose_kernel


def fused_choose(logits: Tensor, threshold: Tensor, rows) -> Tensor | None:
    """`choose` for CUDA logits in one launch (rows: sampling.RowSettings); None without Triton."""
    found = _kernel()
    if found is None or logits.stride(-1) != 1:
        return None
    triton, kernel = found
    count, vocab = logits.shape
    out = torch.empty(count, dtype=torch.int64, device=logits.device)
    kernel[(count,)](logits, logits.stride(0), threshold.reshape(-1).contiguous(), rows.temperature, rows.keys,
                     rows.counters, out, vocab, BLOCK=triton.next_power_of_2(vocab))
    return out
