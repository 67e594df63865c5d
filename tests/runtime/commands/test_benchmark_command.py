"""`benchmark` end to end on the CPU: every cell measured or reported as skipped. No timing assertions."""
from __future__ import annotations

import json

import pytest

from runtime.commands.benchmark import main


def test_benchmark_measures_every_backend_batch_and_context(tiny_past_onnx, tmp_path, capsys):
    report, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main([str(tiny_past_onnx), "--backend", "torch,onnxruntime,onnxruntime-static", "--batch", "1,2",
                 "--context", "8,16", "--new-tokens", "3", "--warmup", "1", "--iters", "2", "--json", str(report),
                 "--plot", str(chart)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("benchmark: CPU") and "onnxruntime" in out.splitlines()[0]
    data = json.loads(report.read_text())
    assert data["environment"]["torch"] and data["precision"] == "float32"
    results = data["results"]
    assert {(r["backend"], r["batch"], r["context"]) for r in results} == {
        (b, n, c) for b in ("torch-cpu", "onnxruntime-cpu", "onnxruntime-cpu-static-cache") for n in (1, 2)
        for c in (8, 16)}
    for r in results:
        assert r["error"] is None and r["prefill_ms"] > 0 and r["decode_p50_ms"] > 0
        assert r["ttft_ms"] > 0 and r["cold_ttft_ms"] > 0
        assert r["decode_p50_ms"] <= r["decode_p90_ms"] <= r["decode_p99_ms"]
        assert r["prefill_tokens_per_s"] == pytest.approx(r["batch"] * r["context"] / r["prefill_ms"] * 1e3)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_backends_are_reported_with_their_reason(tiny_past_onnx, tmp_path):
    code = main([str(tiny_past_onnx), "--backend", "torch,torch-compile,torch-compile-static,tensorrt", "--context", "8",
                 "--new-tokens", "2", "--warmup", "0", "--iters", "1", "--json", str(tmp_path / "b.json")])
    assert code == 0  # torch ran; the others are reported as skipped with their reason
    results = {r["backend"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    assert results["torch-compile"]["error"] == "torch-compile with CUDA graphs needs a GPU"
    assert results["torch-compile-static"]["error"] == "torch-compile-static replays CUDA graphs and needs a GPU"
    assert results["tensorrt"]["error"] == "tensorrt needs --engine PATH"


def test_a_static_cache_graph_is_benchmarked_through_its_own_decoder(tiny_static_onnx, tmp_path):
    assert main([str(tiny_static_onnx), "--backend", "onnxruntime", "--context", "8", "--new-tokens", "2",
                 "--warmup", "1", "--iters", "1", "--json", str(tmp_path / "b.json")]) == 0
    (result,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert result["backend"] == "onnxruntime-cpu-static-cache" and result["decode_p50_ms"] > 0
