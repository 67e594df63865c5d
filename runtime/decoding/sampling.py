"""Next-token choice on the logits' device, for a whole batch at once, each row with its own settings.

Semantics as upstream's `sample` (native-sparse-attention-pytorch): keep the top
ceil((1 - filter_thres) * vocab) logits, divide by the temperature, add Gumbel noise, take the
argmax; temperature <= 0 is greedy. Logits tied with the k-th largest are all kept, so the kept
set depends on values only, never on how a top-k kernel breaks ties. `top_k` caps k further, and
`top_p` (nucleus) then keeps the likeliest kept tokens whose probabilities after the temperature
add up to top_p (the token that crosses it included, ties with it too), in that order as Hugging
Face's and vLLM's samplers apply them.

The noise is counter-based: the Gumbel variate of token v for a row's n-th new token is a hash of
(seed, n, v), computed on the device. A row's draws depend on its own seed and position alone, not
on which rows share the batch, on the device's random state, or on whether the noise was drawn
ahead, so a request gives the same tokens alone, in a busy server batch and offline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .settings import GenerationSettings, kept_count
from .transfer import to_device

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix(x):
    """A 32-bit integer finaliser, on Python ints or int64 tensors holding values < 2**32. Both
    multipliers are below 2**31, so no product overflows int64 (the same bits on every device)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """A request's seed (any 64-bit integer) folded into the 32-bit key its noise starts from."""
    seed &= (1 << 64) - 1
    return _mix(_mix((seed & _MASK) ^ _GOLDEN) ^ (seed >> 32))


def uniform_noise(keys: Tensor, counters: Tensor, vocab_size: int) -> Tensor:
    """(rows,) int64 seed keys and counters -> (rows, vocab) float32 uniforms in (0, 1), each a
    function of (key, counter, token id) only."""
    key = _mix((keys.to(torch.int64) + counters.to(torch.int64) * _GOLDEN) & _MASK)[:, None]
    ids = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = _mix(_mix((key + ids * 0x85EBCA6B) & _MASK) ^ key)
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # 24 bits: exact in float32


def gumbel_noise(keys: Tensor, counters: Tensor, vocab_size: int) -> Tensor:
    """-log(-log(u)) of uniform_noise."""
    return -torch.log(-torch.log(uniform_noise(keys, counters, vocab_size)))


def row_kept(settings: GenerationSettings, vocab_size: int) -> int:
    """How many logits a request's filters keep (filter_thres, then top_k)."""
    return min(kept_count(settings.filter_thres, vocab_size), settings.top_k or vocab_size)


@dataclass
class RowSettings:
    """The sampling settings of a batch's rows as device tensors (the engine keeps one for every
    row: runtime.decoding.row_table)."""

    temperature: Tensor  # (rows,) float32; <= 0 greedy
    kept: Tensor  # (rows,) int64, logits kept per row
    keys: Tensor  # (rows,) int64: seed_key of each row's seed
    counters: Tensor  # (rows,) int64: which new token of its request each row picks next; choose() advances it
    widest: int  # the largest kept count among sampled rows; 0 when every row is greedy
    top_p: Tensor | None = None  # (rows,) float64 nucleus mass; None when no sampled row uses one

    @classmethod
    def of(cls, settings: Sequence[GenerationSettings], counters: Sequence[int], vocab_size: int,
           device: torch.device) -> "RowSettings":
        kept = [row_kept(s, vocab_size) for s in settings]
        sampled = [k for k, s in zip(kept, settings) if s.temperature > 0]
        nucleus = any(s.top_p < 1.0 for s in settings if s.temperature > 0)
        # one copy to the device: every field is exact in float64 (keys < 2**32, counts < 2**53)
        packed = to_device([[s.temperature, k, seed_key(s.seed), c, s.top_p]
                            for s, k, c in zip(settings, kept, counters)], torch.float64, device).reshape(-1, 5)
        return cls(packed[:, 0].float(), packed[:, 1].long(), packed[:, 2].long(), packed[:, 3].long(),
                   max(sampled, default=0), packed[:, 4].contiguous() if nucleus else None)


GREEDY, FUSED, OPS = "greedy", "fused", "ops"  # how choose() picks: argmax, the fused kernel, PyTorch ops


def choice_kind(device: torch.device, rows: RowSettings) -> str:
    """How `choose` picks for these settings: GREEDY when no row samples, FUSED on CUDA with the
    fused kernel and no nucleus row, else OPS (whose shapes depend on rows.widest)."""
    if rows.widest == 0:
        return GREEDY
    if device.type == "cuda" and rows.top_p is None:
        from .sampling_kernel import fused_available

        if fused_available():
            return FUSED
    return OPS


def recording(logits: Tensor) -> bool:
    """Whether work on `logits` is being recorded into a CUDA graph now."""
    return logits.is_cuda and torch.cuda.is_current_stream_capturing()


def choose(logits: Tensor, rows: RowSettings, kind: str | None = None) -> Tensor:
    """(rows, vocab) logits -> (rows,) int64 token ids on the logits' device, each row by its own
    settings, and every row's counter moves on by one; no host synchronisation. On CUDA with
    Triton the noise, the filter and both argmaxes are one fused kernel (sampling_kernel); a batch
    with a nucleus (top_p) row takes the PyTorch ops, which the kernel does not cover yet. `kind`:
    choice_kind's, given by a caller that records this in a CUDA graph; FUSED without the kernel
    then raises while a graph is recorded, where falling back to the ops would freeze their
    shapes into it (otherwise it falls back)."""
    kind_given = kind is not None
    kind = kind or choice_kind(logits.device, rows)
    if kind == GREEDY:
        rows.counters.add_(1)
        return logits.argmax(-1)
    if kind == FUSED:
        from .sampling_kernel import fused_choose

        chosen = fused_choose(logits, rows)
        if chosen is not None:
            return chosen
        if kind_given and recording(logits):
            raise RuntimeError("the fused sampling kernel is not available")
    logits = logits.float()
    threshold = torch.topk(logits, rows.widest, dim=-1).values.gather(-1, (rows.kept.clamp(max=rows.widest) - 1)[:, None])
    greedy = logits.argmax(-1)
    scaled = logits / rows.temperature.clamp(min=1e-10)[:, None]  # a tensor divisor: true division everywhere
    scaled = scaled.masked_fill(logits < threshold, float("-inf"))
    if rows.top_p is not None:
        scaled = nucleus(scaled, rows.top_p)
    sampled = (scaled + gumbel_noise(rows.keys, rows.counters, logits.shape[-1])).argmax(-1)
    rows.counters.add_(1)
    return torch.where(rows.temperature > 0, sampled, greedy)


def nucleus(scaled: Tensor, top_p: Tensor) -> Tensor:
    """Temperature-scaled, filtered logits (rows, vocab) with each row's tokens outside its nucleus
    set to -inf: the likeliest tokens whose probabilities add up to top_p, the one that crosses it
    included, ties with the least likely kept token included. In float64, per row."""
    probabilities = torch.softmax(scaled.double(), dim=-1)
    ordered = probabilities.sort(dim=-1, descending=True, stable=True).values
    before = ordered.cumsum(dim=-1) - ordered  # the mass of the likelier tokens
    smallest = torch.where(before < top_p[:, None], ordered, torch.full_like(ordered, float("inf"))).amin(-1)
    return scaled.masked_fill(probabilities < smallest[:, None], float("-inf"))


def next_tokens(logits: Tensor, settings: GenerationSettings, counter: int = 0) -> Tensor:
    """Every row of (batch, vocab) logits with the same settings, at new-token index `counter`."""
    rows = RowSettings.of([settings] * logits.shape[0], [counter] * logits.shape[0], logits.shape[-1], logits.device)
    return choose(logits, rows)


def top2_margin(logits: Tensor) -> Tensor:
    """(batch, vocab) -> (batch,) gap between the best and second-best logit."""
    top = torch.topk(logits.float(), 2, dim=-1).values
    return top[..., 0] - top[..., 1]
