"""Decoder parity: greedy tokens token by token, teacher forcing through the decode steps, and the
decoder sweep's verdicts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.signature import is_cache_input
from models.transformer import build_model
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.backends.torch_backend import TorchBackend
from runtime.decoding.cache_feed import CacheFeedDecoder
from runtime.decoding.open import open_decoder
from runtime.verify.decoding import check_decoder, compare_generation, random_prompts


def test_greedy_64_tokens_identical_for_an_upstream_checkpoint(upstream_past_onnx):
    path, model = upstream_past_onnx
    prompts = random_prompts(model.config.num_tokens, batch=2, length=6)
    with CacheFeedDecoder(TorchBackend(model, with_past=True), rows=2) as reference, \
            CacheFeedDecoder(OnnxRuntimeBackend(path), rows=2) as candidate:
        result = compare_generation(reference, candidate, prompts, 64)
    assert result, result.summary()
    assert result.tokens_compared == 128 and result.tokens_matched == 128


class _FlipsOneDecodeStep(TorchBackend):
    """PyTorch, except that at its 5th decode step the top-2 logits of every row swap: a greedy
    divergence such as half-precision rounding causes at a near-tie. The steps that teacher
    forcing runs afterwards are clean."""

    steps = 0

    def _run_torch(self, feeds):
        outputs = super()._run_torch(feeds)
        if feeds["input_ids"].shape[1] == 1:
            self.steps += 1
            if self.steps == 5:
                outputs["logits"] = outputs["logits"].clone()
                last = outputs["logits"][:, -1]
                top = last.topk(2, dim=-1).indices
                rows = torch.arange(last.shape[0])
                first, second = last[rows, top[:, 0]].clone(), last[rows, top[:, 1]].clone()
                last[rows, top[:, 0]], last[rows, top[:, 1]] = second, first
        return outputs


class _ZeroesItsCache(TorchBackend):
    """PyTorch with a broken decode step: the key/value cache it is fed is zeroed at every step
    (the prompt's prefill is right)."""

    def _run_torch(self, feeds):
        if feeds["input_ids"].shape[1] == 1:
            feeds = {name: torch.zeros_like(value) if is_cache_input(name) else value for name, value in feeds.items()}
        return super()._run_torch(feeds)


def _decoder(backend):
    return CacheFeedDecoder(backend, rows=2)


def test_a_greedy_flip_fails_fp32_and_is_judged_by_the_forced_steps_at_half_precision(tiny_model):
    prompts = random_prompts(tiny_model.config.num_tokens, batch=2, length=8)
    with _decoder(TorchBackend(tiny_model, with_past=True)) as reference:
        with _decoder(_FlipsOneDecodeStep(tiny_model, with_past=True)) as candidate:
            exact = compare_generation(reference, candidate, prompts, 32)
        with _decoder(_FlipsOneDecodeStep(tiny_model, with_past=True)) as candidate:
            forced = compare_generation(reference, candidate, prompts, 32, "fp16")
    assert not exact and exact.first_divergence["step"] == 5 and exact.teacher_forced_top1 == 1.0
    assert "diverge at row 0 step 5" in exact.summary() and "must be identical" in exact.summary()
    assert forced and forced.first_divergence["step"] == 5 and forced.teacher_forced_top1 == 1.0
    assert forced.steps.positions == 64 and forced.steps.max_abs < 1e-5
    assert "teacher-forced through 64 decode steps: top-1 100.00% (needs >= 99%)" in forced.summary()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "fp16-int8", "fp16-int4-b32"])
def test_a_broken_decode_step_fails_generation_parity_at_every_precision(tiny_model, precision):
    """A decoder that loses its cache at every step: one full-prompt pass cannot see it (the
    prefill is right), the teacher-forced steps do, on top-1 and on the logits."""
    prompts = random_prompts(tiny_model.config.num_tokens, batch=2, length=8)
    with _decoder(TorchBackend(tiny_model, with_past=True)) as reference, \
            _decoder(_ZeroesItsCache(tiny_model, with_past=True)) as candidate:
        result = compare_generation(reference, candidate, prompts, 32, precision)
    assert not result, result.summary()
    assert result.teacher_forced_top1 < 0.9 < result.min_top1  # measured 86 %: a tiny random model leans on the last token
    # the logits fail every bar but int4's (max abs up to max|reference|, cosine >= 0.95; measured 0.99)
    assert not result.steps.passed or precision == "fp16-int4-b32"
    assert "FAILED" in result.summary() and result.to_dict()["passed"] is False


def test_the_right_decoder_passes_and_an_unrelated_model_fails(tiny_model, tiny_past_onnx):
    prompts = random_prompts(tiny_model.config.num_tokens, batch=2, length=8)
    with _decoder(TorchBackend(tiny_model, with_past=True)) as reference:
        with open_decoder(tiny_past_onnx, "onnxruntime", rows=2) as candidate:
            right = compare_generation(reference, candidate, prompts, 32)
        with _decoder(TorchBackend(build_model(tiny_model.config, seed=1), with_past=True)) as candidate:
            unrelated = compare_generation(reference, candidate, prompts, 32, "fp16")
    assert right and right.tokens_matched == 64 and right.steps.max_abs < 1e-4, right.summary()
    assert not unrelated and unrelated.teacher_forced_top1 < 0.5


def test_decoder_sweep_passes_the_right_weights_and_fails_the_wrong_ones(tiny_model, tiny_past_onnx):
    good = check_decoder(tiny_model, lambda rows: open_decoder(tiny_past_onnx, "onnxruntime", rows), [1, 3], [1, 9])
    assert good and len(good.results) == 8 and max(r.max_abs for r in good.results) < 1e-4
    other = build_model(tiny_model.config, seed=1)
    bad = check_decoder(other, lambda rows: open_decoder(tiny_past_onnx, "onnxruntime", rows), [2], [5])
    assert not bad and "FAILED" in bad.summary()


def test_a_flip_within_one_ulp_of_the_precision_is_a_tie_and_a_wider_one_is_not():
    from models.precision import precision
    from runtime.verify.decoding import forced_agreement

    expected = np.zeros((1, 4, 3))  # one row, four forced steps, three tokens; the largest logit is 8
    expected[0, :, 0] = 8.0
    expected[0, 1, 1] = 8.0 - 0.006  # within fp16's ulp at 8 (8 / 1024 = 0.0078), not within fp32's
    expected[0, 2, 2] = 8.0 - 0.5  # a real disagreement at every precision but far coarser ones
    forced = np.zeros((1, 4), dtype=np.int64)
    chosen = np.array([[0, 1, 2, 0]])
    half, ties = forced_agreement(expected, chosen, forced, precision("fp16"))
    assert half == 0.75 and [f["step"] for f in ties] == [1, 2] and ties[0]["tie"] == 8 / 1024
    assert abs(ties[0]["reference_gap"] - 0.006) < 1e-12 and abs(ties[1]["reference_gap"] - 0.5) < 1e-12
    assert forced_agreement(expected, chosen, forced, precision("fp32"))[0] == 0.5
    assert forced_agreement(expected, chosen, forced, precision("bf16"))[0] == 0.75  # 8 / 128 = 0.0625 < 0.5
    assert forced_agreement(expected, chosen, forced, precision("fp16-int4-b32"))[0] == 0.75  # the float row's ulp
