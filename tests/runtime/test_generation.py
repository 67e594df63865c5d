"""Generation through the key/value cache, on PyTorch and ONNX Runtime (CPU)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from models.transformer import build_model
from runtime.backends import BackendError
from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from runtime.backends.torch_backend import TorchBackend
from runtime.generation import (GenerationError, GenerationSettings, Generator, decode_bytes, encode_text, left_pad)
from runtime.generation_parity import compare_generation, random_prompts
from runtime.sampling import next_tokens, top_k_filter


def test_with_past_graph_names_and_symbolic_axes(tiny_past_onnx, tiny_config):
    graph = onnx.load(str(tiny_past_onnx), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    for i in range(tiny_config.depth):
        for kind in ("key", "value"):
            assert dims[f"past_key_values.{i}.{kind}"] == ["batch", tiny_config.kv_heads, "past_sequence",
                                                           tiny_config.dim_head]
            present = dims[f"present.{i}.{kind}"]
            assert present[2] in ("past_sequence + sequence", "sequence + past_sequence")
    assert [o.name for o in graph.output][0] == "logits"


@pytest.mark.parametrize("past", [0, 1, 150])
def test_with_past_graph_matches_pytorch_at_past_lengths(tiny_past_onnx, tiny_model, past):
    from runtime.parity import Case, check_parity

    with TorchBackend(tiny_model, with_past=True) as reference, OnnxRuntimeBackend(tiny_past_onnx) as candidate:
        report = check_parity(reference, candidate, [Case(1, 1, past=past), Case(3, 5, past=past),
                                                     Case(3, 4, padded=True, past=past)])
    assert report, report.summary()
    assert max(r.max_abs for r in report.results) < 1e-4
    assert {r.output for r in report.results} >= {"logits", "present.0.key", "present.1.value"}


def test_greedy_64_tokens_identical_torch_and_onnxruntime(tiny_past_onnx, tiny_model):
    prompts = random_prompts(tiny_model.config.num_tokens, batch=2, length=8)
    with TorchBackend(tiny_model, with_past=True) as reference, OnnxRuntimeBackend(tiny_past_onnx) as candidate:
        result = compare_generation(reference, candidate, prompts, 64)
    assert result, result.summary()
    assert result.tokens_compared == 128 and result.tokens_matched == 128


def test_greedy_identical_for_upstream_checkpoint(upstream_past_onnx):
    path, model = upstream_past_onnx
    prompts = random_prompts(model.config.num_tokens, batch=2, length=6)
    with TorchBackend(model, with_past=True) as reference, OnnxRuntimeBackend(path) as candidate:
        result = compare_generation(reference, candidate, prompts, 64)
    assert result, result.summary()


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
    with TorchBackend(tiny_model, with_past=True) as reference:
        with _FlipsOneDecodeStep(tiny_model, with_past=True) as candidate:
            exact = compare_generation(reference, candidate, prompts, 32)
        with _FlipsOneDecodeStep(tiny_model, with_past=True) as candidate:
            forced = compare_generation(reference, candidate, prompts, 32, min_top1=0.99)
        other = build_model(tiny_model.config, seed=1)
        with TorchBackend(other, with_past=True) as candidate:
            unrelated = compare_generation(reference, candidate, prompts, 32, min_top1=0.99)
    assert not exact and exact.first_divergence["step"] == 5 and exact.teacher_forced_top1 is None
    assert "diverge at row 0 step 5" in exact.summary()
    assert forced and forced.first_divergence["step"] == 5 and forced.teacher_forced_top1 == 1.0
    assert "teacher-forced top-1 agreement 100.00% (needs >= 99%)" in forced.summary()
    assert not unrelated and unrelated.teacher_forced_top1 < 0.5


def test_cache_decoding_equals_full_recompute(tiny_onnx, tiny_past_onnx, tiny_model):
    settings = GenerationSettings(max_new_tokens=24)
    prompts = [[5, 6, 7, 8], [9, 10]]  # ragged: left padding must not change the continuation
    with OnnxRuntimeBackend(tiny_onnx) as plain, OnnxRuntimeBackend(tiny_past_onnx) as cached:
        recompute = Generator(plain).generate(prompts, settings).tokens
        through_cache = Generator(cached).generate(prompts, settings).tokens
    alone = Generator(TorchBackend(tiny_model, with_past=True)).generate([prompts[1]], settings).tokens
    assert recompute == through_cache
    assert through_cache[1] == alone[0]


def test_sampling_is_reproducible_with_a_seed_and_changes_without(tiny_past_onnx, tiny_model):
    settings = GenerationSettings(max_new_tokens=16, temperature=1.0, filter_thres=0.5, seed=7)
    prompts = [[1, 2, 3]]
    with OnnxRuntimeBackend(tiny_past_onnx) as backend:
        first = Generator(backend).generate(prompts, settings).tokens
        second = Generator(backend).generate(prompts, settings).tokens
        other = Generator(backend).generate(prompts, GenerationSettings(16, 1.0, 0.5, seed=8)).tokens
    on_torch = Generator(TorchBackend(tiny_model, with_past=True)).generate(prompts, settings).tokens
    assert first == second == on_torch
    assert first != other
    assert len(set(first[0])) > 1


def test_upstream_sampling_semantics():
    # k = ceil((1 - thres) * vocab) exactly as upstream, float rounding included (0.7 keeps 4 of 10)
    assert torch.isfinite(top_k_filter(torch.zeros(1, 10), 0.7)).sum() == 4
    logits = torch.tensor([[0.0, 5.0, 1.0, 3.0, 2.0, -1.0, 4.0, 0.5, 0.2, 0.1]])
    kept = top_k_filter(logits, 0.75)  # ceil(0.25 * 10) = 3 logits survive
    assert torch.isfinite(kept).sum() == 3 and set(torch.nonzero(torch.isfinite(kept[0])).flatten().tolist()) == {1, 3, 6}
    generator = torch.Generator().manual_seed(0)
    assert next_tokens(logits, 0.0, 0.9, generator).tolist() == [1]  # temperature <= 0: greedy
    picks = {next_tokens(logits, 1.0, 0.75, generator).item() for _ in range(200)}
    assert picks <= {1, 3, 6} and len(picks) > 1


def test_end_token_stops_a_row(tiny_model):
    backend = TorchBackend(tiny_model, with_past=True)
    free = Generator(backend).generate([[1, 2, 3]], GenerationSettings(max_new_tokens=10)).tokens[0]
    stop = free[3]
    stopped = Generator(backend).generate([[1, 2, 3]], GenerationSettings(max_new_tokens=10, eos_id=stop)).tokens[0]
    assert stopped == free[: free.index(stop) + 1]


def test_bad_prompts_and_caches_are_refused(tiny_past_onnx, tiny_model):
    backend = OnnxRuntimeBackend(tiny_past_onnx)
    with pytest.raises(GenerationError, match="token id 256 is out of range; the vocabulary is 0..255"):
        Generator(backend).generate([[1, 256]], GenerationSettings(max_new_tokens=2))
    limited = TorchBackend(tiny_model.__class__(tiny_model.config.replace(max_seq_len=16)).eval(), with_past=True)
    with pytest.raises(GenerationError, match="past the model's max_seq_len of 16"):
        Generator(limited).generate([list(range(10))], GenerationSettings(max_new_tokens=8))
    feeds = {"input_ids": np.ones((1, 1), np.int64), "attention_mask": np.ones((1, 4), np.int64)}
    for i in range(tiny_model.config.depth):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 3, 16), np.float32)
    feeds["past_key_values.1.value"] = np.zeros((1, 2, 5, 16), np.float32)
    with pytest.raises(BackendError, match="past_sequence"):
        backend.run(feeds)
    feeds["past_key_values.1.value"] = np.zeros((1, 2, 3, 16), np.float32)
    feeds["attention_mask"] = np.ones((1, 9), np.int64)
    with pytest.raises(BackendError, match="total_sequence is 9 but past_sequence \\+ sequence is 4"):
        backend.run(feeds)
    feeds["attention_mask"] = np.ones((1, 4), np.int64)
    feeds["past_key_values.0.key"] = np.zeros((1, 3, 3, 16), np.float32)
    with pytest.raises(BackendError, match="dimension 1 must be 2"):
        backend.run(feeds)


def test_byte_level_text():
    assert encode_text("hé", 256) == [104, 195, 169]
    assert decode_bytes([104, 195, 169, 300]) == "hé<300>"
    with pytest.raises(GenerationError, match="at least 256 tokens"):
        encode_text("hi", 64)
    ids, mask = left_pad([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generate_cli(tiny_past_onnx, capsys, tmp_path):
    from runtime.generate_cli import main

    report = tmp_path / "gen.json"
    assert main(["--model", str(tiny_past_onnx), "--prompt", "Hi", "--max-new-tokens", "8", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["prompt_ids"] == [72, 105] and len(data["tokens"]) == 8
    expected = Generator(TorchBackend(__import__("models.source").source.resolve_model().model, with_past=True)).generate(
        [[72, 105]], GenerationSettings(max_new_tokens=8)).tokens[0]
    assert data["tokens"] == expected
    assert "tokens/s" in capsys.readouterr().out
    assert main(["--model", str(tiny_past_onnx), "--prompt-ids", "1,999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["generate: error: prompt token id 999 is out of range; the vocabulary is 0..255"]


def test_check_parity_generate(tiny_past_onnx, tmp_path, capsys):
    from runtime.parity_cli import main

    report = tmp_path / "parity.json"
    assert main([str(tiny_past_onnx), "--seq", "1,9", "--batch", "1,2", "--generate", "16", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["passed"] and data["generation"]["tokens_compared"] == 32
    assert data["generation"]["first_divergence"] is None
    assert any(c["case"]["past"] > 0 for c in data["cases"])
