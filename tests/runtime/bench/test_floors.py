"""The physical floors a benchmark result is divided by."""
from __future__ import annotations

import pytest

from models.precision import PRECISIONS
from models.presets import preset
from runtime.bench.floors import (decode_bytes, decode_floor_seconds, matmul_params, matmul_shapes, peaks_for,
                                  prefill_flops, prefill_floor_seconds)


def test_floor_arithmetic_for_the_small_preset():
    config = preset("small")  # dim 768, depth 12, 12 heads of 64, vocab 32000, ff 4x
    per_layer = 768 * (768 + 2 * 768) + 768 * 768 + 2 * 768 * 3072
    assert matmul_params(config) == 12 * per_layer + 768 * 32000 == 109_510_656
    assert prefill_flops(config, 1, 1) == 2 * 109_510_656 + 12 * 2 * 12 * 64
    assert prefill_flops(config, 8, 1024) == 2 * 109_510_656 * 8 * 1024 + 12 * 2 * 8 * 12 * 64 * 1024 * 1024
    cache = 2 * 12 * 1 * 12 * 64 * 1024  # keys and values of every layer
    fp16, fp32 = PRECISIONS["fp16"], PRECISIONS["fp32"]
    assert decode_bytes(config, 1, 1024, fp16) == (109_510_656 + cache) * 2
    assert decode_bytes(config, 1, 1024, fp32) == (109_510_656 + cache) * 4
    h100 = peaks_for("NVIDIA H100 80GB HBM3")
    assert h100.bandwidth == 3.35e12 and h100.half_flops == 989e12
    assert decode_floor_seconds(config, 1, 1024, fp16, h100) == pytest.approx((109_510_656 + cache) * 2 / 3.35e12)
    assert prefill_floor_seconds(config, 8, 1024, fp16, h100) == pytest.approx(prefill_flops(config, 8, 1024) / 989e12)
    assert prefill_floor_seconds(config, 8, 1024, fp32, h100) == pytest.approx(prefill_flops(config, 8, 1024) / 67e12)
    assert peaks_for("NVIDIA H200").bandwidth == 4.8e12
    assert peaks_for("Some Unknown GPU") is None


def test_quantized_rows_change_the_decode_floor_through_their_weight_bytes():
    from models.precision import precision

    config = preset("small")
    head = 768 * 32000
    blocks = 109_510_656 - head
    scales = sum(n * (k // 32) for k, n in matmul_shapes(config)[:-1])  # one fp16 scale per 32 rows per column
    assert decode_bytes(config, 1, 0, precision("fp16-int4-b32")) == blocks / 2 + scales * 2 + head * 2
    per_channel = sum(n for _, n in matmul_shapes(config)[:-1])
    assert decode_bytes(config, 1, 0, precision("fp16-int8")) == blocks + per_channel * 2 + head * 2
