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
    code = main([str(tiny_past_onnx), "--backend", "torch,torch-compile,torch-compile-static", "--context", "8",
                 "--new-tokens", "2", "--warmup", "0", "--iters", "1", "--json", str(tmp_path / "b.json")])
    assert code == 0  # torch ran; the others are reported as skipped with their reason
    results = {r["backend"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    for name in ("torch-compile", "torch-compile-static"):
        assert results[name]["error"] == (f"the {name} backend runs on a CUDA GPU, and this machine has none that "
                                          "PyTorch can see; run it on a GPU machine, or use --backend torch here")


def test_a_static_cache_graph_is_benchmarked_through_its_own_decoder(tiny_static_onnx, tmp_path):
    assert main([str(tiny_static_onnx), "--backend", "onnxruntime", "--context", "8", "--new-tokens", "2",
                 "--warmup", "1", "--iters", "1", "--json", str(tmp_path / "b.json")]) == 0
    (result,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert result["backend"] == "onnxruntime-cpu-static-cache" and result["decode_p50_ms"] > 0


@pytest.mark.parametrize("flags, overlap", [([], True), (["--no-overlap"], False)])
def test_the_report_says_which_loop_was_asked_for_and_which_ran(tiny_static_onnx, tmp_path, flags, overlap):
    """The overlapped loop is asked for unless --no-overlap; on the CPU every step blocks, so each
    decoder runs the plain loop either way, and its result says so."""
    assert main([str(tiny_static_onnx), "--backend", "onnxruntime,torch", "--context", "8", "--new-tokens", "3",
                 "--warmup", "1", "--iters", "1", *flags, "--json", str(tmp_path / "b.json")]) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["settings"]["overlap"] is overlap
    assert [r["decode_loop"] for r in data["results"]] == ["plain", "plain"]
    assert all(r["error"] is None and r["decode_p50_ms"] > 0 for r in data["results"]) and len(data["results"]) == 2


def test_help_lists_the_registrys_defaults_for_each_machine():
    """The defaults --help names are the registry's (it once left out torch-compile-static and
    onnxruntime-cuda-static-portable)."""
    import re

    from runtime.commands.benchmark import build_parser
    from runtime.registry import ENGINE, ONNX, WEIGHTS, default_backends

    text = next(action.help for action in build_parser()._actions if action.dest == "backend")
    listed = re.search(r"marks for this machine: on a GPU (.*?); on the CPU (.*?)\)", text)
    for machine, cuda in ((listed.group(1), True), (listed.group(2), False)):
        names = [item.split(" with ")[0] for item in machine.split(", ")]
        assert names == default_backends(cuda, (WEIGHTS, ONNX, ENGINE))


def test_a_graph_without_a_cache_is_said_to_decode_by_full_recomputation(tiny_onnx, tiny_past_onnx, tmp_path, capsys):
    flags = ["--backend", "onnxruntime", "--context", "8", "--new-tokens", "2", "--warmup", "0", "--iters", "1"]
    assert main([str(tiny_onnx), *flags, "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "decodes by full recomputation (MODEL has no key/value cache)" in out and "--with-past" in out
    (result,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert result["decode_mode"] == "full recompute"
    assert main([str(tiny_past_onnx), *flags, "--json", str(tmp_path / "b.json")]) == 0
    assert "full recomputation" not in capsys.readouterr().out
    (result,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert result["decode_mode"] == "cache"


def test_a_static_cache_graph_given_as_model_is_what_its_static_backend_runs(tiny_static_graph, tmp_path,
                                                                               monkeypatch):
    """The *-static backend of MODEL's kind runs MODEL (no graph is written from the weights), and
    a run that needs more cache than MODEL holds is an error cell naming both sizes."""
    from runtime.commands import targets

    monkeypatch.setattr(targets, "static_graph_bytes", lambda *a, **k: pytest.fail("wrote a graph from the weights"))
    graph = tiny_static_graph(16)

    def bench(context: str) -> dict:
        assert main([str(graph), "--backend", "onnxruntime-static,torch", "--context", context, "--new-tokens", "2",
                     "--warmup", "1", "--iters", "1", "--json", str(tmp_path / "b.json")]) == 0
        return {(r["backend"], r["context"]): r for r in json.loads((tmp_path / "b.json").read_text())["results"]}

    fits = bench("8,11")  # 11 + 1 warm-up + 2 new + 2 = 16 tokens: what MODEL holds
    assert all(r["error"] is None and r["decode_p50_ms"] > 0 for r in fits.values()) and len(fits) == 4
    too_long = bench("12")
    assert too_long[("onnxruntime-static", 12)]["error"] == (
        "MODEL's static cache holds 16 tokens and this run needs 17 (context + warm-up + new tokens + 2); export a "
        "larger --static-cache or lower --context")
    assert too_long[("torch-cpu", 12)]["error"] is None
