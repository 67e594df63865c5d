"""The static-cache decoder (GroupQueryAttention graph) against PyTorch on the CPU: model variants,
fp16, capacity and what it refuses."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from export.static_cache_graph import build_static_cache_graph
from models.transformer import build_model
from runtime.backends import BackendError
from runtime.decoding.base import DecodingError
from runtime.decoding.generation import GenerationSettings, generate
from runtime.decoding.static_cache import StaticCacheDecoder, contiguous_runs, warm_up_lengths
from runtime.verify.decoding import check_decoder


def _decoder_factory(model, max_cache=64, precision="fp32"):
    data = build_static_cache_graph(model, max_cache, precision).SerializeToString()
    return lambda rows: StaticCacheDecoder(data, rows, "cpu")


@pytest.mark.parametrize("variant", [{}, {"norm": "layer", "ff_bias": False},
                                     {"qkv": "separate", "rotary_pairing": "half", "kv_heads": 1}])
def test_prompt_and_decode_steps_match_pytorch_for_model_variants(tiny_config, variant):
    model = build_model(dataclasses.replace(tiny_config, **variant), seed=1)
    report = check_decoder(model, _decoder_factory(model), [1, 3], [1, 5, 40], steps=8)
    assert report, report.summary()
    assert len(report.results) == 12 and max(r.max_abs for r in report.results) < 1e-5
    assert {r.output for r in report.results} == {"logits (prompt)", "logits (8 decode steps)"}


def test_fp16_graph_is_within_the_half_precision_tolerance(tiny_model):
    report = check_decoder(tiny_model, _decoder_factory(tiny_model, precision="fp16"), [3], [17], steps=8,
                           precision="fp16")
    assert report, report.summary()
    assert min(r.top1 for r in report.results) >= 0.99


def test_a_full_cache_and_an_overlong_request_are_refused(tiny_model):
    with _decoder_factory(tiny_model, max_cache=16)(1) as decoder:
        with pytest.raises(DecodingError, match="past the graph's 16-token static cache"):
            generate(decoder, [[1] * 10], GenerationSettings(max_new_tokens=8))
        with pytest.raises(DecodingError, match="a 17-token prompt is longer than the graph's 16-token static cache"):
            decoder.start({0: [1] * 17})
        decoder.start({0: [1] * 15})
        decoder.step(torch.tensor([1]))
        with pytest.raises(DecodingError, match="holds 16 tokens and is full .the graph's 16-token static cache"):
            decoder.step(torch.tensor([1]))


def test_a_portable_graph_is_not_a_static_cache_graph(tiny_onnx):
    with pytest.raises(BackendError, match="not a static-cache graph"):
        StaticCacheDecoder(tiny_onnx, 1, "cpu")


def test_started_rows_are_prefilled_in_contiguous_runs():
    assert contiguous_runs([5, 0, 1, 2, 6, 9]) == [[0, 1, 2], [5, 6], [9]]


def test_warm_up_covers_the_full_window_then_a_ladder_of_prompt_lengths_ending_at_one():
    assert warm_up_lengths(2048) == [2048, 1024, 256, 64, 16, 4, 1]
    assert warm_up_lengths(100) == [100, 64, 16, 4, 1] and warm_up_lengths(1) == [1]
