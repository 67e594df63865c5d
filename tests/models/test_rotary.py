"""models.rotary against formulas written out here, and against rotary-embedding-torch."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.rotary import apply_rotary, inverse_frequencies, rotary_cos_sin


def reference_rotation(x: np.ndarray, positions: np.ndarray, theta: float, pairing: str) -> np.ndarray:
    """float64 rotary, one feature pair at a time. x: (b, h, n, d); positions: (b, n).

    interleaved: pair (2i, 2i+1); half: pair (i, i + d/2); both rotated by pos * theta^(-2i/d).
    """
    b, h, n, d = x.shape
    out = np.empty_like(x, dtype=np.float64)
    for i in range(d // 2):
        first, second = (2 * i, 2 * i + 1) if pairing == "interleaved" else (i, i + d // 2)
        angle = positions[:, None, :].astype(np.float64) * theta ** (-2.0 * i / d)  # (b, 1, n)
        a, c = x[..., first].astype(np.float64), x[..., second].astype(np.float64)
        out[..., first] = a * np.cos(angle) - c * np.sin(angle)
        out[..., second] = a * np.sin(angle) + c * np.cos(angle)
    return out


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float, pairing: str) -> torch.Tensor:
    d = x.shape[-1]
    cos, sin = rotary_cos_sin(positions, inverse_frequencies(d, theta), pairing)
    return apply_rotary(x, cos, sin, pairing)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rotation_matches_pairwise_formula(pairing, theta):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 11, 16, generator=generator)
    positions = torch.stack((torch.arange(11), torch.arange(11) * 3 + 5))  # two different position rows
    got = rotate(x, positions, theta, pairing).double().numpy()
    want = reference_rotation(x.numpy(), positions.numpy(), theta, pairing)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # the rotation is not the identity here, so the comparison above is not vacuous
    assert np.abs(want - x.numpy()).max() > 0.5


def test_pairings_differ():
    """The two pairings are different functions (a swapped implementation would be caught)."""
    x = torch.randn(1, 1, 5, 8, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(5)[None]
    assert (rotate(x, positions, 10000.0, "interleaved") - rotate(x, positions, 10000.0, "half")).abs().max() > 1e-2


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_rotation_preserves_pair_norms_and_position_zero_is_identity(pairing):
    x = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[0, 1, 1000, 99999]])
    out = rotate(x, positions, 10000.0, pairing)
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0], atol=1e-7, rtol=0)
    if pairing == "interleaved":
        pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    else:
        pair_norm = lambda t: torch.stack(t.chunk(2, dim=-1), dim=-1).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(x), atol=1e-5, rtol=1e-5)


def test_inverse_frequencies_formula():
    freqs = inverse_frequencies(16, 10000.0)
    assert freqs.dtype == torch.float32 and freqs.shape == (8,)
    want = np.array([10000.0 ** (-2.0 * i / 16) for i in range(8)])
    np.testing.assert_allclose(freqs.double().numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_angles_stay_accurate_at_large_positions(pairing):
    """cos/sin at position ~1e5 within pos * 2e-7 of a float64 reference (float32 rounding of
    the angle, nothing worse: no fp16 angles, no table lookups that wrap)."""
    d, theta = 64, 10000.0
    positions = torch.tensor([[100000, 100001, 123457, 65537, 99991]])
    cos, sin = rotary_cos_sin(positions, inverse_frequencies(d, theta), pairing)
    assert cos.shape == sin.shape == (1, 1, 5, d)
    inv = np.array([theta ** (-2.0 * i / d) for i in range(d // 2)])
    inv = np.repeat(inv, 2) if pairing == "interleaved" else np.concatenate((inv, inv))
    angles = positions.numpy().astype(np.float64)[0][:, None] * inv[None]  # (n, d)
    bound = positions.numpy().astype(np.float64)[0][:, None] * 2e-7
    cos_err = np.abs(cos[0, 0].double().numpy() - np.cos(angles))
    sin_err = np.abs(sin[0, 0].double().numpy() - np.sin(angles))
    assert (cos_err <= bound).all(), f"cos error {cos_err.max():.3e} > bound {bound.max():.3e}"
    assert (sin_err <= bound).all(), f"sin error {sin_err.max():.3e} > bound {bound.max():.3e}"


def test_large_position_rotation_matches_float64_formula():
    x = torch.randn(1, 1, 3, 32, generator=torch.Generator().manual_seed(11))
    positions = torch.tensor([[100000, 100003, 200000]])
    got = rotate(x, positions, 10000.0, "interleaved").double().numpy()
    want = reference_rotation(x.numpy(), positions.numpy(), 10000.0, "interleaved")
    # |x| per pair is O(3), angle error O(pos * 2e-7)
    assert np.abs(got - want).max() < 3 * 200000 * 2e-7


def test_interleaved_equals_rotary_embedding_torch():
    from rotary_embedding_torch import RotaryEmbedding

    d, n = 16, 50
    x = torch.randn(2, 4, n, d, generator=torch.Generator().manual_seed(13))
    upstream = RotaryEmbedding(d)  # theta 10000, interleaved pairs
    want = upstream.rotate_queries_or_keys(x)  # positions 0..n-1 along dim -2
    got = rotate(x, torch.arange(n)[None].expand(2, n), 10000.0, "interleaved")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (want - x).abs().max() > 0.5
    # and the same frequencies
    torch.testing.assert_close(inverse_frequencies(d, 10000.0), upstream.freqs.detach().float(), rtol=1e-6, atol=0)


def test_angle_multiplication_is_float32_not_lower():
    """A half-precision angle at position 100000 would be off by tens of radians."""
    cos, _ = rotary_cos_sin(torch.tensor([[100000]]), inverse_frequencies(2, 10000.0), "interleaved")
    assert cos.dtype == torch.float32
    assert abs(float(cos[0, 0, 0, 0]) - math.cos(100000.0)) < 100000 * 2e-7
