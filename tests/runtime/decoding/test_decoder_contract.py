"""The Decoder contract, run against every decoder that works on the CPU: the same tokens for the
same seed, rows that join and leave at their own positions, and the same errors for bad calls."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.decoding.base import DecodingError
from runtime.decoding.generation import GenerationSettings, generate


def full_forward(model, tokens: list[int]) -> np.ndarray:
    """PyTorch logits (n, vocab) for one row, no cache: the reference every step is held to."""
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0].numpy()


def test_greedy_tokens_equal_pytorch_for_ragged_prompts(open_cpu_decoder, torch_decoder):
    prompts = [[5, 6, 7, 8, 9], [9, 10]]  # ragged: padding must not change a row's continuation
    settings = GenerationSettings(max_new_tokens=24)
    with torch_decoder(2) as reference, open_cpu_decoder(2) as decoder:
        expected = generate(reference, prompts, settings).tokens
        assert generate(decoder, prompts, settings).tokens == expected
    with open_cpu_decoder(1) as alone:
        assert generate(alone, [prompts[1]], settings).tokens[0] == expected[1]


def test_sampled_tokens_equal_pytorch_for_the_same_seed(open_cpu_decoder, torch_decoder):
    settings = GenerationSettings(max_new_tokens=16, temperature=1.0, filter_thres=0.5, seed=7)
    with torch_decoder(1) as reference, open_cpu_decoder(1) as decoder:
        expected = generate(reference, [[1, 2, 3]], settings).tokens
        first = generate(decoder, [[1, 2, 3]], settings).tokens
        second = generate(decoder, [[1, 2, 3]], settings).tokens  # rows released and started again
        other_seed = generate(decoder, [[1, 2, 3]], GenerationSettings(16, 1.0, 0.5, seed=8)).tokens
    assert first == second == expected
    assert first != other_seed and len(set(first[0])) > 1


@pytest.mark.parametrize("every_row", [False, True], ids=["step", "step_every_row"])
def test_rows_join_and_leave_between_steps_at_their_own_positions(open_cpu_decoder, tiny_model, every_row):
    """Row 0 decodes alone, row 2 joins mid-way, row 0 leaves and is restarted with a new prompt;
    every step of every row equals PyTorch's full forward pass over that row's tokens. With
    `step_every_row` the idle row 1 gets a token too, which must change nothing."""
    rng = np.random.default_rng(3)
    history = {0: [11, 12, 13, 14, 15, 16, 17]}
    with open_cpu_decoder(3) as decoder:
        got = decoder.start({0: history[0]}).numpy()
        np.testing.assert_allclose(got[0], full_forward(tiny_model, history[0])[-1], atol=1e-4)
        for step in range(6):
            if step == 2:
                history[2] = [40, 41, 42]
                joined = decoder.start({2: history[2]})
                np.testing.assert_allclose(joined[0].numpy(), full_forward(tiny_model, history[2])[-1], atol=1e-4)
            if step == 4:
                decoder.release([0])
                history[0] = [7, 8]
                decoder.start({0: history[0]})
            assert decoder.active == sorted(history) and decoder.lengths == {r: len(t) for r, t in history.items()}
            if every_row:
                tokens = [int(t) for t in rng.integers(0, 256, size=decoder.rows)]
                logits = decoder.step_every_row(torch.tensor(tokens)).clone().numpy()
                places = {row: row for row in decoder.active}
            else:
                tokens = [int(t) for t in rng.integers(0, 256, size=len(history))]
                logits = decoder.step(torch.tensor(tokens)).clone().numpy()
                places = {row: index for index, row in enumerate(decoder.active)}
            assert logits.shape[0] == (decoder.rows if every_row else len(places))
            for row, place in places.items():
                history[row].append(tokens[place])
                np.testing.assert_allclose(logits[place], full_forward(tiny_model, history[row])[-1], atol=1e-4,
                                           err_msg=f"row {row} at step {step}")


def test_all_logits_cover_every_prompt_position(open_cpu_decoder, tiny_model):
    prompts = {0: [3, 1, 4, 1, 5, 9, 2], 1: [6, 5]}
    with open_cpu_decoder(2) as decoder:
        logits = decoder.start(prompts, all_logits=True)
    for row, prompt in prompts.items():
        assert tuple(logits[row].shape) == (len(prompt), 256)
        np.testing.assert_allclose(logits[row].numpy(), full_forward(tiny_model, prompt), atol=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda d: d.start({0: [1, 256]}), "prompt token id 256 is out of range; the vocabulary is 0..255"),
    (lambda d: d.start({0: [-1]}), "prompt token id -1 is out of range; the vocabulary is 0..255"),
    (lambda d: d.start({0: []}), "every prompt needs at least one token"),
    (lambda d: d.start({2: [1]}), "row 2 does not exist; this decoder has rows 0..1"),
    (lambda d: d.start({}), "start\\(\\) needs at least one prompt"),
    (lambda d: d.step(torch.tensor([1])), "no active rows: start\\(\\) some rows before step\\(\\)"),
    (lambda d: (d.start({0: [1], 1: [2]}), d.step(torch.tensor([1])))[-1],
     "step\\(\\) takes one token per active row \\(2\\), got 1"),
    (lambda d: (d.start({0: [1]}), d.step_every_row(torch.tensor([1])))[-1],
     "step_every_row\\(\\) takes one token per row \\(2\\), got 1"),
    (lambda d: generate(d, [[1], [2], [3]], GenerationSettings(4)), "3 prompts but the decoder has 2 rows"),
    (lambda d: generate(d, [[1]], GenerationSettings(4, temperature=float("nan"))),
     "--temperature must be a finite number, got nan"),
    (lambda d: generate(d, [[1]], GenerationSettings(4, eos_id=300)), "--eos-id 300 is outside the vocabulary"),
    (lambda d: generate(d, [[1]], GenerationSettings(0)), "--max-new-tokens must be at least 1"),
])
def test_bad_calls_raise_the_same_error_everywhere(open_cpu_decoder, call, message):
    with open_cpu_decoder(2) as decoder:
        with pytest.raises(DecodingError, match=message):
            call(decoder)


def test_a_closed_decoder_refuses_work(open_cpu_decoder):
    decoder = open_cpu_decoder(1)
    decoder.close()
    with pytest.raises(DecodingError, match="the decoder is closed; open a new one"):
        decoder.start({0: [1]})


def test_last_position_logits_equal_the_last_row_of_full_logits(open_cpu_decoder):
    prompts = {0: [3, 1, 4, 1, 5, 9, 2], 1: [6, 5]}
    with open_cpu_decoder(2) as decoder:
        full = decoder.start(prompts, all_logits=True)
        last = decoder.start(prompts)
    for i, row in enumerate(prompts):
        np.testing.assert_allclose(last[i].numpy(), full[i][-1].numpy(), atol=1e-5)


def test_the_overlapped_engine_loop_gives_the_plain_loops_tokens(open_cpu_decoder, engine_loops):
    """The engine's overlapped loop (each step queued before the last is read) on every CPU decoder:
    greedy and seeded-sampled requests, more than the rows, half of them stopping at an end-of-sequence
    token, get the tokens the plain loop gives and the tokens each gets alone. The GPU tests hold the
    CUDA decoders to the same."""
    requests = [([1 + i, 2 * i + 3, 7], GenerationSettings(12 + 3 * i, [0.0, 0.9][i % 2], 0.5, seed=i))
                for i in range(6)]
    with open_cpu_decoder(2) as decoder:
        requests, plain, overlapped, alone = engine_loops(decoder, requests)
    assert plain == overlapped == alone
    assert len({tuple(t) for t in alone}) == len(alone)
    assert all(len(alone[i]) < settings.max_new_tokens for i, (_, settings) in enumerate(requests) if i % 2 == 0)
    assert all(len(alone[i]) == settings.max_new_tokens for i, (_, settings) in enumerate(requests) if i % 2)
