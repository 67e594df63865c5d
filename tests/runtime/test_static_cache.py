"""The static-cache ONNX Runtime decoder (GroupQueryAttention graph) against PyTorch, on the CPU."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from export.onnx_export import ExportError
from export.static_cache_graph import build_static_cache_graph, query_head_order
from models.transformer import build_model
from runtime.backends import BackendError
from runtime.generation import GenerationError, GenerationSettings
from runtime.generation_parity import random_prompts
from runtime.static_cache import StaticCacheDecoder
from runtime.static_cache_parity import check_static_cache, compare_static_generation


def _decoder_factory(model, max_cache=64, dtype="fp32"):
    data = build_static_cache_graph(model, max_cache, dtype).SerializeToString()
    return lambda batch: StaticCacheDecoder(data, batch, "cpu")


def test_query_heads_regrouped_for_group_query_attention():
    # 4 query heads, 2 kv heads: model head j reads kv head j % 2, GQA slot p reads kv head p // 2
    order = query_head_order(4, 2)
    assert order == [0, 2, 1, 3]
    assert all(order[p] % 2 == p // 2 for p in range(4))


@pytest.mark.parametrize("variant", [{}, {"norm": "layer", "ff_bias": False},
                                     {"qkv": "separate", "rotary_pairing": "half", "kv_heads": 1}])
def test_prompt_and_decode_steps_match_pytorch(tiny_config, variant):
    model = build_model(dataclasses.replace(tiny_config, **variant), seed=1)
    report = check_static_cache(model, _decoder_factory(model), [1, 3], [1, 5, 40], steps=8)
    assert report, report.summary()
    assert len(report.results) == 12 and max(r.max_abs for r in report.results) < 1e-5
    assert {r.output for r in report.results} == {"logits (prompt)", "logits (8 decode steps)"}


def test_fp16_graph_within_half_precision_tolerance(tiny_model):
    report = check_static_cache(tiny_model, _decoder_factory(tiny_model, dtype="fp16"), [3], [17], steps=8,
                                precision="float16")
    assert report, report.summary()
    assert min(r.top1 for r in report.results) >= 0.99


def test_greedy_64_tokens_identical_to_pytorch(tiny_model):
    prompts = random_prompts(tiny_model.config.num_tokens, batch=2, length=8)
    with _decoder_factory(tiny_model, max_cache=80)(2) as decoder:
        result = compare_static_generation(tiny_model, decoder, prompts, 64)
    assert result, result.summary()
    assert result.tokens_compared == 128 and result.tokens_matched == 128


def test_sampling_matches_the_portable_generator(tiny_model):
    from runtime.backends.torch_backend import TorchBackend
    from runtime.generation import Generator

    settings = GenerationSettings(max_new_tokens=24, temperature=1.0, filter_thres=0.5, seed=7)
    with TorchBackend(tiny_model, with_past=True) as backend:
        expected = Generator(backend).generate([[3, 1, 4, 1, 5]], settings).tokens
    with _decoder_factory(tiny_model)(1) as decoder:
        assert decoder.generate([[3, 1, 4, 1, 5]], settings).tokens == expected


def test_bad_inputs_are_refused(tiny_model, tiny_config, tmp_path):
    with _decoder_factory(tiny_model, max_cache=16)(1) as decoder:
        with pytest.raises(GenerationError, match="past the graph's 16-token static cache"):
            decoder.generate([[1] * 10], GenerationSettings(max_new_tokens=8))
        with pytest.raises(GenerationError, match="out of range; the vocabulary is 0..255"):
            decoder.generate([[256]], GenerationSettings(max_new_tokens=1))
        with pytest.raises(GenerationError, match="set up for batch 1, got 2 prompts"):
            decoder.prefill([[1], [2]])
        decoder.prefill([[1] * 15])
        decoder.step(torch.tensor([1]))
        with pytest.raises(GenerationError, match="static cache holds 16 tokens and is full"):
            decoder.step(torch.tensor([1]))
    odd = build_model(dataclasses.replace(tiny_config, dim=48, dim_head=8, heads=4, kv_heads=2))
    with pytest.raises(ExportError, match="dim_head divisible by 16, this model has 8"):
        build_static_cache_graph(odd, 16)
    with pytest.raises(BackendError, match="not a static-cache graph"):
        from export.onnx_export import export_onnx

        plain = tmp_path / "plain.onnx"
        export_onnx(tiny_model, plain, log=lambda _: None)
        StaticCacheDecoder(plain, 1, "cpu")


def test_export_check_generate_and_benchmark_commands(tmp_path, capsys):
    from export.cli import main as export_main
    from runtime.benchmark_cli import main as benchmark_main
    from runtime.generate_cli import main as generate_main
    from runtime.parity_cli import main as parity_main

    path = tmp_path / "static.onnx"
    assert export_main(["--static-cache", "96", "--output", str(path), "--json", str(tmp_path / "e.json")]) == 0
    exported = json.loads((tmp_path / "e.json").read_text())
    assert exported["kind"] == "onnxruntime-static-cache" and exported["verify"]["passed"]
    assert parity_main([str(path), "--seq", "1,9,33", "--generate", "16", "--json", str(tmp_path / "p.json")]) == 0
    parity = json.loads((tmp_path / "p.json").read_text())
    assert parity["passed"] and parity["generation"]["tokens_matched"] == 32
    assert parity_main([str(path), "--backend", "tensorrt"]) == 2
    assert "static-cache graph; check it with --backend onnxruntime" in capsys.readouterr().err
    assert generate_main(["--model", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                          "--json", str(tmp_path / "g.json")]) == 0
    assert len(json.loads((tmp_path / "g.json").read_text())["tokens"]) == 5
    assert benchmark_main([str(path), "--backend", "onnxruntime-static", "--context", "8", "--new-tokens", "2",
                           "--warmup", "1", "--iters", "1", "--json", str(tmp_path / "b.json")]) == 0
    (result,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert result["backend"] == "onnxruntime-cpu-static-cache" and result["decode_p50_ms"] > 0
    assert export_main(["--static-cache", "8", "--with-past", "--output", str(tmp_path / "x.onnx")]) == 2
    assert "drop --with-past" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
