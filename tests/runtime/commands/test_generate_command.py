"""`generate` in-process: tokens equal PyTorch's, every decoder kind, one-line errors."""
from __future__ import annotations

import json

import pytest

from command_helpers import assert_one_line_error
from runtime.commands.generate import main


@pytest.fixture(scope="module")
def pytorch_tokens(tiny_source):
    """PyTorch's greedy continuation of "Hi" (ids 72, 105): what every backend must print."""
    from runtime.decoding.generation import GenerationSettings, generate
    from runtime.decoding.open import open_decoder

    with open_decoder(tiny_source, "torch", device="cpu") as decoder:
        return generate(decoder, [[72, 105]], GenerationSettings(max_new_tokens=8)).tokens[0]


@pytest.mark.parametrize("model, backend", [("tiny_past_onnx", "auto"), ("tiny_static_onnx", "onnxruntime"),
                                            ("tiny_onnx", "onnxruntime"), (None, "torch"),
                                            (None, "onnxruntime-static")])
def test_text_prompt_gives_pytorchs_tokens_on_every_decoder(request, model, backend, pytorch_tokens, tmp_path, capsys):
    report = tmp_path / "gen.json"
    path = [] if model is None else ["--model", str(request.getfixturevalue(model))]
    code = main([*path, "--backend", backend, "--prompt", "Hi", "--max-new-tokens", "8", "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["prompt_ids"] == [72, 105] and data["tokens"] == pytorch_tokens
    assert "tokens/s" in capsys.readouterr().out


def test_token_outside_the_vocabulary_is_one_error_line(tiny_past_onnx, capsys):
    assert main(["--model", str(tiny_past_onnx), "--prompt-ids", "1,999"]) == 2
    assert_one_line_error(capsys, "generate", "prompt token id 999 is out of range; the vocabulary is 0..255")


def test_a_file_backend_without_a_model_is_one_error_line(capsys):
    assert main(["--backend", "onnxruntime", "--prompt-ids", "1"]) == 2
    assert_one_line_error(capsys, "generate", "--model is required for the onnxruntime backend")
