"""Next-token choice with the upstream semantics (native-sparse-attention-pytorch `sample`)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def top_k_filter(logits: Tensor, filter_thres: float) -> Tensor:
    """Keep the top ceil((1 - filter_thres) * vocab) logits (at least one); the rest become -inf."""
    k = max(1, math.ceil((1.0 - filter_thres) * logits.shape[-1]))
    values, indices = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def gumbel_noise(shape, generator: torch.Generator) -> Tensor:
    """-log(-log(u)) on the CPU generator, so a seed gives the same tokens on every device."""
    uniform = torch.rand(shape, generator=generator)
    neg_log = -torch.log(uniform.clamp(min=1e-20))  # in (0, 46]
    return -torch.log(neg_log.clamp(min=1e-20))


def next_tokens(logits: Tensor, temperature: float, filter_thres: float, generator: torch.Generator) -> Tensor:
    """(batch, vocab) logits -> (batch,) token ids; temperature <= 0 means greedy."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    filtered = top_k_filter(logits, filter_thres)
    noise = gumbel_noise(filtered.shape, generator).to(filtered.device)
    return (filtered / max(temperature, 1e-10) + noise).argmax(-1)


def top2_margin(logits: Tensor) -> Tensor:
    """(batch, vocab) -> (batch,) gap between the best and second-best logit."""
    top = torch.topk(logits.float(), 2, dim=-1).values
    return top[..., 0] - top[..., 1]
