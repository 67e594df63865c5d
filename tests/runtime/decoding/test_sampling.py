"""Token choice on the device: upstream's semantics, counter-based noise, and every row of a batch
choosing exactly what it chooses alone."""
from __future__ import annotations

import pytest
import torch

from runtime.decoding.sampling import RowSettings, choose, next_tokens, seed_key, uniform_noise
from runtime.decoding.settings import kept_count
from runtime.decoding.settings import GenerationSettings


def settings(temperature: float, filter_thres: float = 0.9, seed: int = 0) -> GenerationSettings:
    return GenerationSettings(8, temperature, filter_thres, seed)


def test_each_row_of_a_batched_choice_equals_that_row_chosen_alone():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3)).half()
    rows = [settings(0.0, 0.9, 1), settings(0.8, 0.9, 2), settings(1.2, 0.5, 3), settings(0.0, 0.5, 4),
            settings(0.7, 0.9, 5), settings(1.0, 0.0, 6)]
    counters = [0, 5, 9, 2, 0, 130]
    alone = [int(choose(logits[i:i + 1], RowSettings.of([s], [c], 300, logits.device))[0])
             for i, (s, c) in enumerate(zip(rows, counters))]
    assert choose(logits, RowSettings.of(rows, counters, 300, logits.device)).tolist() == alone
    order = [5, 2, 0, 4, 1, 3]  # another batch layout: the same tokens, row by row
    shuffled = choose(logits[order], RowSettings.of([rows[i] for i in order], [counters[i] for i in order], 300,
                                                    logits.device))
    assert shuffled.tolist() == [alone[i] for i in order]
    assert alone[0] == int(logits[0].float().argmax()) and alone[3] == int(logits[3].float().argmax())


def test_noise_is_a_function_of_seed_counter_and_token_id_only():
    seeds, counters = torch.tensor([seed_key(s) for s in (7, 7, 8, -5, 2**62)]), torch.tensor([0, 1, 0, 0, 3])
    assert len(set(seeds.tolist())) == 4 and all(0 <= int(key) < 2**32 for key in seeds)
    noise = uniform_noise(seeds, counters, 50)
    assert torch.equal(noise[1:2], uniform_noise(seeds[1:2], counters[1:2], 50))  # alone == batched
    assert torch.equal(noise[:, :20], uniform_noise(seeds, counters, 20))  # token v's draw ignores the vocabulary size
    assert len({tuple(row.tolist()) for row in noise}) == 5  # seeds and counters all draw differently
    assert 0.0 < float(noise.min()) and float(noise.max()) < 1.0
    many = uniform_noise(torch.full((2000,), seed_key(0)), torch.arange(2000), 64)
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float(many.var()) - 1 / 12) < 0.002


def test_upstream_filter_keeps_the_top_k_and_ties_with_the_kth_value():
    # k = ceil((1 - thres) * vocab) exactly as upstream, float rounding included (0.7 keeps 4 of 10)
    assert kept_count(0.7, 10) == 4 and kept_count(0.4, 5) == 3 and kept_count(0.999, 5) == 1
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0, 2.0, -1.0, 4.0, 0.5, 0.2, 0.1]])
    picks = {int(next_tokens(logits, settings(5.0, 0.75, seed), 0)[0]) for seed in range(300)}
    assert picks == {1, 3, 6}  # ceil(0.25 * 10) = 3 logits survive; a hot temperature draws all three
    assert {int(next_tokens(logits, settings(0.05, 0.75, seed), 0)[0]) for seed in range(300)} == {1}
    assert next_tokens(logits, settings(0.0), 0).tolist() == [1]  # temperature <= 0: greedy
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])  # k = 2, but three logits tie at the k-th value
    assert {int(next_tokens(tied, settings(1.0, 0.6, seed), 0)[0]) for seed in range(200)} == {1, 2, 4}


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
    off by 0.1), which 40,000 draws tell apart with a bar of 0.015 (4 standard errors). The draws
    are one seed's successive tokens (counters), as a long generation makes them."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 40_000
    expected = softmax_over_kept(logits, temperature, kept_count(filter_thres, 6))
    rows = RowSettings.of([settings(temperature, filter_thres, 11)] * draws, range(draws), 6, logits.device)
    frequencies = torch.bincount(choose(logits.expand(draws, -1), rows), minlength=6).double() / draws
    assert (frequencies - expected).abs().max() < 0.015, (frequencies.tolist(), expected.tolist())


def test_choosing_moves_every_rows_counter_on():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    rows = RowSettings.of([settings(0.0), settings(1.0), settings(0.9, 0.5)], [0, 4, 9], 40, logits.device)
    first, second = choose(logits, rows), choose(logits, rows)
    assert rows.counters.tolist() == [2, 6, 11] and first[0] == second[0]  # greedy: the argmax both times
    fresh = RowSettings.of([settings(1.0)], [5], 40, logits.device)
    assert int(choose(logits[1:2], fresh)[0]) == int(second[1])  # the second draw is the one at counter 5


def test_top_k_caps_the_kept_set_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    picks = lambda **knobs: {int(next_tokens(logits, GenerationSettings(4, 50.0, 0.0, seed, **knobs), 0)[0])
                             for seed in range(400)}
    assert picks() == set(range(8)) and picks(top_k=3) == {0, 1, 2} and picks(top_k=3, top_p=1.0) == {0, 1, 2}
    # at temperature 1 the probabilities are 0.63, 0.23, 0.086, ...: 0.5 keeps one token, 0.7 two, 0.9 three
    nucleus_of = lambda p: {int(next_tokens(logits, GenerationSettings(4, 1.0, 0.0, seed, top_p=p), 0)[0])
                            for seed in range(400)}
    assert nucleus_of(0.5) == {0} and nucleus_of(0.7) == {0, 1} and nucleus_of(0.9) == {0, 1, 2}
    assert int(next_tokens(logits, GenerationSettings(4, 0.0, 0.0, top_p=0.1), 0)[0]) == 0  # greedy ignores both


@pytest.mark.parametrize("top_p", [0.6, 0.95])
def test_nucleus_frequencies_follow_the_renormalised_softmax(top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probabilities = torch.softmax(logits, -1)
    ordered, order = probabilities.sort(descending=True)
    keep = order[(ordered.cumsum(0) - ordered) < top_p]
    expected = torch.zeros(6)
    expected[keep] = probabilities[keep] / probabilities[keep].sum()
    draws = 40_000
    rows = RowSettings.of([GenerationSettings(8, 1.0, 0.0, 3, top_p=top_p)] * draws, range(draws), 6, logits.device)
    frequencies = torch.bincount(choose(logits.expand(draws, -1), rows), minlength=6).double() / draws
    assert (frequencies - expected.double()).abs().max() < 0.015, (frequencies.tolist(), expected.tolist())


def test_rows_with_top_k_and_top_p_draw_the_same_alone_and_batched():
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    rows = [GenerationSettings(8, 0.9, 0.0, seed=i, top_k=[0, 5, 0, 12, 3][i], top_p=[1.0, 1.0, 0.8, 0.5, 0.9][i])
            for i in range(5)]
    alone = [int(choose(logits[i:i + 1], RowSettings.of([s], [7], 64, logits.device))[0]) for i, s in enumerate(rows)]
    assert choose(logits, RowSettings.of(rows, [7] * 5, 64, logits.device)).tolist() == alone


def test_the_choice_kind_follows_the_settings_and_a_recorded_choice_never_falls_back(monkeypatch):
    from runtime.decoding import sampling, sampling_kernel
    from runtime.decoding.sampling import FUSED, GREEDY, OPS, choice_kind

    logits = torch.randn(2, 50)
    greedy = RowSettings.of([GenerationSettings(), GenerationSettings()], [0, 0], 50, logits.device)
    sampled = [GenerationSettings(), GenerationSettings(temperature=1.0)]
    rows = RowSettings.of(sampled, [0, 0], 50, logits.device)
    assert choice_kind(logits.device, greedy) == GREEDY and choice_kind(logits.device, rows) == OPS  # no kernel off CUDA
    assert torch.equal(choose(logits, greedy, GREEDY), logits.argmax(-1)) and greedy.counters.tolist() == [1, 1]
    monkeypatch.setattr(sampling_kernel, "fused_choose", lambda logits, rows: None)  # a kernel that cannot run
    # not recorded: the PyTorch ops pick what they pick without a kind
    assert torch.equal(choose(logits, rows, FUSED), choose(logits, RowSettings.of(sampled, [0, 0], 50, logits.device)))
    monkeypatch.setattr(sampling, "recording", lambda logits: True)
    with pytest.raises(RuntimeError, match="the fused sampling kernel is not available"):
        choose(logits, rows, FUSED)
