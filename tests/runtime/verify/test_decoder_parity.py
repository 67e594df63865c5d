"""Decoder parity: greedy tokens token by token, teacher forcing for half precision, and the
decoder sweep's verdicts."""
from __future__ import annotations

import torch

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
    divergence that teacher forcing (one full forward pass) does not see."""

    steps = 0

    def run_torch(self, feeds):
        outputs = super().run_torch(feeds)
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


def test_half_precision_generation_is_judged_by_teacher_forcing(tiny_model):
    prompts = random_prompts(tiny_model.config.num_tokens, batch=2, length=8)

    def decoder(backend):
        return CacheFeedDecoder(backend, rows=2)

    with decoder(TorchBackend(tiny_model, with_past=True)) as reference:
        with decoder(_FlipsOneDecodeStep(tiny_model, with_past=True)) as candidate:
            exact = compare_generation(reference, candidate, prompts, 32)
        with decoder(_FlipsOneDecodeStep(tiny_model, with_past=True)) as candidate:
            forced = compare_generation(reference, candidate, prompts, 32, min_top1=0.99)
        with decoder(TorchBackend(build_model(tiny_model.config, seed=1), with_past=True)) as candidate:
            unrelated = compare_generation(reference, candidate, prompts, 32, min_top1=0.99)
    assert not exact and exact.first_divergence["step"] == 5 and exact.teacher_forced_top1 is None
    assert "diverge at row 0 step 5" in exact.summary()
    assert forced and forced.first_divergence["step"] == 5 and forced.teacher_forced_top1 == 1.0
    assert "teacher-forced top-1 agreement 100.00% (needs >= 99%)" in forced.summary()
    assert not unrelated and unrelated.teacher_forced_top1 < 0.5


def test_decoder_sweep_passes_the_right_weights_and_fails_the_wrong_ones(tiny_model, tiny_past_onnx):
    good = check_decoder(tiny_model, lambda rows: open_decoder(tiny_past_onnx, "onnxruntime", rows), [1, 3], [1, 9])
    assert good and len(good.results) == 8 and max(r.max_abs for r in good.results) < 1e-4
    other = build_model(tiny_model.config, seed=1)
    bad = check_decoder(other, lambda rows: open_decoder(tiny_past_onnx, "onnxruntime", rows), [2], [5])
    assert not bad and "FAILED" in bad.summary()
