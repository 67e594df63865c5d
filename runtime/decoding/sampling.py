"""Next-token choice with the upstream semantics (native-sparse-attention-pytorch `sample`): keep
the top ceil((1 - filter_thres) * vocab) logits, divide by the temperature, add Gumbel noise, take
the argmax; temperature <= 0 is greedy.

The noise comes from a CPU generator, so a seed gives the same tokens on every device, and it is
drawn only for the kept logits, ordered by token id: Gumbel-max over the kept set is the same
distribution as over the whole vocabulary with -inf elsewhere, at a tenth of the host work with
the default filter (a server samples every row at every step)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def kept_count(filter_thres: float, vocab_size: int) -> int:
    """How many logits survive the top-k filter (at least one), float rounding as upstream."""
    return max(1, math.ceil((1.0 - filter_thres) * vocab_size))


def top_k_filter(logits: Tensor, filter_thres: float) -> Tensor:
    """Keep the top kept_count logits; the rest become -inf."""
    values, indices = torch.topk(logits, kept_count(filter_thres, logits.shape[-1]), dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def gumbel_noise(shape, generator: torch.Generator) -> Tensor:
    """-log(-log(u)) on the CPU generator."""
    uniform = torch.rand(shape, generator=generator)
    neg_log = -torch.log(uniform.clamp(min=1e-20))  # in (0, 46]
    return -torch.log(neg_log.clamp(min=1e-20))


def sample_kept(logits: Tensor, temperatures: Tensor, noise: Tensor) -> Tensor:
    """(rows, vocab) float logits, (rows, 1) temperatures on their device, (rows, k) CPU noise ->
    (rows,) token ids. The kept logits are put in token-id order before the noise is added, so ties
    in value cannot make two batchings of the same row draw differently."""
    _, indices = torch.topk(logits, noise.shape[-1], dim=-1)
    indices = indices.sort(dim=-1).values
    scaled = logits.gather(-1, indices) / temperatures  # a tensor divisor: true division on every device
    pick = (scaled + noise.to(logits.device, non_blocking=True)).argmax(-1, keepdim=True)
    return indices.gather(-1, pick).squeeze(-1)


def next_tokens(logits: Tensor, temperature: float, filter_thres: float, generator: torch.Generator) -> Tensor:
    """(batch, vocab) logits -> (batch,) token ids, one generator for the batch."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    rows, vocab = logits.shape
    noise = gumbel_noise((rows, kept_count(filter_thres, vocab)), generator)
    temperatures = torch.full((rows, 1), max(temperature, 1e-10), device=logits.device)
    return sample_kept(logits, temperatures, noise)


def row_noise(temperature: float, filter_thres: float, vocab_size: int, generator: torch.Generator) -> Tensor | None:
    """One row's noise for its next token, (1, kept) or None when greedy. It does not depend on the
    logits, so a server draws it while the decode step runs."""
    return gumbel_noise((1, kept_count(filter_thres, vocab_size)), generator) if temperature > 0 else None


def next_tokens_per_row(logits: Tensor, temperatures: Sequence[float], noise: Sequence[Tensor | None]) -> list[int]:
    """(rows, vocab) logits, each row with its own temperature and row_noise -> one token per row;
    row i gets exactly what next_tokens(logits[i:i+1], ...) gives with that row's generator. Greedy
    rows take one argmax, sampled rows one top-k per kept count, one host copy in all."""
    logits = logits.float()
    chosen = logits.argmax(-1)
    groups: dict[int, list[int]] = {}
    for row, drawn in enumerate(noise):
        if drawn is not None:
            groups.setdefault(drawn.shape[-1], []).append(row)
    for rows in groups.values():
        index = torch.tensor(rows, device=logits.device)
        scale = torch.tensor([[max(temperatures[row], 1e-10)] for row in rows], device=logits.device)
        chosen[index] = sample_kept(logits[index], scale, torch.cat([noise[row] for row in rows]))
    return chosen.tolist()


def top2_margin(logits: Tensor) -> Tensor:
    """(batch, vocab) -> (batch,) gap between the best and second-best logit."""
    top = torch.topk(logits.float(), 2, dim=-1).values
    return top[..., 0] - top[..., 1]
