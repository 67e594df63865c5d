"""The benchmark command end to end on the CPU, and the floor arithmetic. No timing assertions."""
from __future__ import annotations

import json

import pytest

from models.presets import preset
from runtime.floors import (decode_bytes, decode_floor_seconds, matmul_params, peaks_for, prefill_flops,
                            prefill_floor_seconds)


def test_floor_arithmetic_for_the_small_preset():
    config = preset("small")  # dim 768, depth 12, 12 heads of 64, vocab 32000, ff 4x
    per_layer = 768 * (768 + 2 * 768) + 768 * 768 + 2 * 768 * 3072
    assert matmul_params(config) == 12 * per_layer + 768 * 32000 == 109_510_656
    assert prefill_flops(config, 1, 1) == 2 * 109_510_656 + 12 * 2 * 12 * 64
    assert prefill_flops(config, 8, 1024) == 2 * 109_510_656 * 8 * 1024 + 12 * 2 * 8 * 12 * 64 * 1024 * 1024
    cache = 2 * 12 * 1 * 12 * 64 * 1024  # keys and values of every layer
    assert decode_bytes(config, 1, 1024, 2) == (109_510_656 + cache) * 2
    h100 = peaks_for("NVIDIA H100 80GB HBM3")
    assert h100.bandwidth == 3.35e12 and h100.half_flops == 989e12
    assert decode_floor_seconds(config, 1, 1024, 2, h100) == pytest.approx((109_510_656 + cache) * 2 / 3.35e12)
    assert prefill_floor_seconds(config, 8, 1024, True, h100) == pytest.approx(prefill_flops(config, 8, 1024) / 989e12)
    assert peaks_for("NVIDIA H200").bandwidth == 4.8e12
    assert peaks_for("Some Unknown GPU") is None


def test_benchmark_runs_end_to_end_on_the_cpu(tiny_past_onnx, tmp_path, capsys):
    from runtime.benchmark_cli import main

    report, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main([str(tiny_past_onnx), "--backend", "torch,onnxruntime", "--batch", "1,2", "--context", "8,16",
                 "--new-tokens", "3", "--warmup", "1", "--iters", "2", "--json", str(report), "--plot", str(chart)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("benchmark: CPU") and "onnxruntime" in out.splitlines()[0]
    data = json.loads(report.read_text())
    assert data["environment"]["torch"] and data["precision"] == "float32"
    results = data["results"]
    assert {(r["backend"], r["batch"], r["context"]) for r in results} == {
        (b, n, c) for b in ("torch-cpu", "onnxruntime-cpu") for n in (1, 2) for c in (8, 16)}
    for r in results:
        assert r["error"] is None and r["prefill_ms"] > 0 and r["decode_p50_ms"] > 0
        assert r["decode_p50_ms"] <= r["decode_p90_ms"] <= r["decode_p99_ms"]
        assert r["prefill_tokens_per_s"] == pytest.approx(r["batch"] * r["context"] / r["prefill_ms"] * 1e3)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_reports_unavailable_backends(tiny_past_onnx, tmp_path, capsys):
    from runtime.benchmark_cli import main

    code = main([str(tiny_past_onnx), "--backend", "torch,torch-compile,tensorrt", "--context", "8",
                 "--new-tokens", "2", "--warmup", "0", "--iters", "1", "--json", str(tmp_path / "b.json")])
    assert code == 0  # torch ran; the others are reported as skipped with their reason
    results = {r["backend"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    assert results["torch-compile"]["error"] == "torch-compile with CUDA graphs needs a GPU"
    assert results["tensorrt"]["error"] == "tensorrt needs --engine PATH"
