"""Batched per-row sampling equals each row sampled alone."""
from __future__ import annotations

import pytest
import torch

from runtime.decoding.sampling import kept_count, next_tokens, next_tokens_per_row, row_noise, sample_kept


def test_each_row_of_a_batched_choice_equals_that_row_sampled_alone():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3)).half()
    settings = [(0.0, 0.9), (0.8, 0.9), (1.2, 0.5), (0.0, 0.5), (0.7, 0.9), (1.0, 0.0)]
    alone = [int(next_tokens(logits[i:i + 1], t, f, torch.Generator().manual_seed(i))[0])
             for i, (t, f) in enumerate(settings)]
    noise = [row_noise(t, f, 300, torch.Generator().manual_seed(i)) for i, (t, f) in enumerate(settings)]
    assert next_tokens_per_row(logits, [t for t, _ in settings], noise) == alone
    assert [n is None for n in noise] == [True, False, False, True, False, False]
    assert [n.shape[-1] for n in noise if n is not None] == [30, 150, 30, 300]


def test_tied_logits_draw_by_token_id_whatever_the_topk_order():
    """fp16 logits tie often: the kept set is put in token-id order before the noise is added."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    noise = torch.tensor([[0.0, 5.0, 0.0]])  # the second-lowest kept id wins
    assert sample_kept(logits, torch.ones(1, 1), noise).tolist() == [2]
    assert kept_count(0.4, 5) == 3 and kept_count(0.999, 5) == 1


def test_sampling_stays_inside_the_kept_set_and_follows_temperature():
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0, 2.0, -1.0, 4.0, 0.5, 0.2, 0.1]])
    generator = torch.Generator().manual_seed(0)
    hot = [int(next_tokens(logits, 5.0, 0.75, generator)[0]) for _ in range(300)]
    cold = [int(next_tokens(logits, 0.05, 0.75, generator)[0]) for _ in range(300)]
    assert set(hot) == {1, 3, 6} and set(cold) == {1}


def softmax_over_kept(logits: torch.Tensor, temperature: float, kept: int) -> torch.Tensor:
    """The distribution sampling must draw from: softmax(logits / temperature) over the top `kept`."""
    top = torch.topk(logits, kept).indices
    probabilities = torch.zeros_like(logits)
    probabilities[top] = torch.softmax(logits[top] / temperature, -1)
    return probabilities


@pytest.mark.parametrize("temperature, filter_thres", [(1.0, 0.0), (0.7, 0.0), (1.3, 0.5)])
def test_sampled_frequencies_follow_softmax_of_logits_over_temperature(temperature, filter_thres):
    """Gumbel-max draws exactly softmax(logits / T) over the kept set; other noise (uniform, normal)
    draws a different distribution (uniform noise: the top token 0.56 -> 1.0 at T = 1; normal:
    off by 0.1), which 40,000 seeded draws tell apart with a bar of 0.015 (4 standard errors)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 40_000
    expected = softmax_over_kept(logits, temperature, kept_count(filter_thres, 6))
    tokens = next_tokens(logits.expand(draws, -1), temperature, filter_thres, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=6).double() / draws
    assert (frequencies - expected).abs().max() < 0.015, (frequencies.tolist(), expected.tolist())
    # the server's path: one row at a time, noise drawn ahead of the logits
    generator, rows = torch.Generator().manual_seed(1), 4_000
    noise = [row_noise(temperature, filter_thres, 6, generator) for _ in range(rows)]
    served = next_tokens_per_row(logits.expand(rows, -1), [temperature] * rows, noise)
    frequencies = torch.bincount(torch.tensor(served), minlength=6).double() / rows
    assert (frequencies - expected).abs().max() < 0.035, (frequencies.tolist(), expected.tolist())  # 4 s.e.
