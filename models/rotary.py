"""Rotary position embedding as pure functions of positions: no cache, no length cap."""
from __future__ import annotations

import torch
from torch import Tensor


def inverse_frequencies(dim_head: int, theta: float) -> Tensor:
    """The dim_head // 2 rotation frequencies theta^(-2i/dim_head), float32."""
    return 1.0 / (theta ** (torch.arange(0, dim_head, 2, dtype=torch.float32) / dim_head))


def rotary_cos_sin(positions: Tensor, inv_freq: Tensor, pairing: str) -> tuple[Tensor, Tensor]:
    """cos and sin tables for integer `positions` (b, n) -> two (b, 1, n, dim_head) tensors.

    Angles are computed in float32 from the positions themselves, so the same graph serves
    any sequence length. `pairing` decides which features form a rotation pair:
    "interleaved" pairs (0, 1), (2, 3), ... (rotary-embedding-torch, upstream);
    "half" pairs i with i + dim_head // 2 (GPT-NeoX / Llama `rotate_half`).
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (b, n, d/2)
    if pairing == "interleaved":
        angles = torch.stack((angles, angles), dim=-1).flatten(-2)  # (b, n, d): f0 f0 f1 f1 ...
    else:
        angles = torch.cat((angles, angles), dim=-1)  # (b, n, d): f0 f1 ... f0 f1 ...
    angles = angles[:, None]  # (b, 1, n, d), broadcasts over heads
    return angles.cos(), angles.sin()


def rotate_pairs(x: Tensor, pairing: str) -> Tensor:
    """The 90-degree rotation of each feature pair: (a, b) -> (-b, a)."""
    if pairing == "interleaved":
        x = x.unflatten(-1, (-1, 2))  # (..., d/2, 2)
        first, second = x[..., 0], x[..., 1]
        return torch.stack((-second, first), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # slices, not chunk: chunk exports as Split, which opset 17 cannot express here
    first, second = x[..., :half], x[..., half:]
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, pairing: str) -> Tensor:
    """Rotate x (b, h, n, dim_head) by the angles whose cos/sin are given; float32 math."""
    dtype = x.dtype
    x = x.to(torch.float32)
    return (x * cos + rotate_pairs(x, pairing) * sin).to(dtype)
