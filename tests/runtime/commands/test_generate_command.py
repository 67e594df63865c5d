"""`generate` in-process: tokens equal PyTorch's, every decoder kind, one-line errors."""
from __future__ import annotations

import json
import unicodedata

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


def test_printed_text_is_the_reports_text_escaped_and_tokens_per_second_is_tokens_over_time(tmp_path, capsys):
    """A text prompt, sampled: seed 5 makes the tiny model write three multi-byte characters among
    broken bytes and stop inside a fourth. What is printed token by token is the report's text with
    the broken bytes and control characters escaped, and the rate is the decoded tokens over the
    decode time."""
    from runtime.commands.generate import TerminalText
    from runtime.decoding.text import decode_bytes

    report = tmp_path / "gen.json"
    assert main(["--backend", "torch", "--prompt", "héllo ✓", "--max-new-tokens", "48", "--temperature", "2",
                 "--filter-thres", "0", "--seed", "5", "--json", str(report)]) == 0
    data, out = json.loads(report.read_text()), capsys.readouterr().out
    text = data["text"]
    assert len(data["tokens"]) == 48 and text == decode_bytes(data["tokens"])
    unfinished = 0xC2 <= data["tokens"][-1] <= 0xF4  # a lead byte: only the final flush prints its U+FFFD
    assert len([c for c in text if ord(c) > 127 and c != "\ufffd"]) >= 3 and unfinished, "pick another seed"
    pieces = TerminalText()
    shown = "".join(pieces.piece(token) for token in data["tokens"]) + pieces.flush()
    assert f"up to 48 new\n{shown}\n48 tokens;" in out
    assert [c for c in shown if ord(c) > 127] == [c for c in text if ord(c) > 127 and c != "\ufffd"]
    assert "\\x" in shown and all(c in "\n\t" or unicodedata.category(c) != "Cc" for c in shown)
    assert data["decode_seconds"] > 0 and data["decode_tokens_per_second"] == pytest.approx(47 / data["decode_seconds"])
    assert f"decode {data['decode_tokens_per_second']:.1f} tokens/s" in out


def test_top_k_of_one_and_a_tiny_nucleus_are_greedy_at_any_temperature(tmp_path):
    """--top-k 1 keeps only the likeliest token, and so does a nucleus smaller than its probability:
    both give the greedy tokens at a hot temperature, where plain sampling does not."""
    def tokens(*extra):
        report = tmp_path / "gen.json"
        assert main(["--backend", "torch", "--prompt-ids", "5,6,7", "--max-new-tokens", "16", "--json", str(report),
                     *extra]) == 0
        return json.loads(report.read_text())["tokens"]

    greedy = tokens()
    hot = ["--temperature", "3", "--filter-thres", "0", "--seed", "4"]
    assert tokens(*hot) != greedy
    assert tokens(*hot, "--top-k", "1") == greedy and tokens(*hot, "--top-p", "0.001") == greedy


def test_a_nucleus_outside_zero_to_one_is_one_error_line(capsys):
    assert main(["--backend", "torch", "--prompt-ids", "1", "--top-p", "1.5"]) == 2
    assert_one_line_error(capsys, "generate", "argument --top-p: expected a number in (0, 1], got 1.5")


def test_control_bytes_and_broken_utf8_are_escaped_on_the_terminal():
    """An escape sequence, a carriage return, a bell, a C1 code, a bidirectional override and bytes
    that are not UTF-8 reach the terminal as visible escapes; text, newlines and tabs as they are."""
    from runtime.commands.generate import TerminalText

    raw = (b"ok \x1b[2J\r\x07 caf\xc3\xa9 \xc2\x85 \xe2\x80\xae \xff\xfe \xe2\x9c" + b"\n\tend")
    pieces = TerminalText()
    shown = "".join(pieces.piece(byte) for byte in raw) + pieces.flush()
    assert shown == "ok \\x1b[2J\\x0d\\x07 café \\x85 \\u202e \\xff\\xfe \\xe2\\x9c\n\tend"
    pieces = TerminalText()
    assert "".join(pieces.piece(t) for t in (0xE2, 300, 65)) == "\\xe2<300>A"  # an id ends an unfinished character


@pytest.mark.parametrize("fixture, argv, message", [
    ("tiny_past_onnx", ["--prompt-ids", "1,2,999"], "prompt token id 999 is out of range; the vocabulary is 0..255"),
    ("tiny_past_onnx", ["--prompt-ids", "1", "--eos-id", "999"], "--eos-id 999 is outside the vocabulary 0..255"),
    ("tiny_static_onnx", ["--prompt-ids", "1,2", "--max-new-tokens", "100"],
     "the 2-token prompt plus --max-new-tokens 100 is 102 tokens, past the 96 a row of"),
])
def test_requests_a_model_cannot_take_are_refused_before_it_is_opened(request, fixture, argv, message, capsys,
                                                                        monkeypatch):
    from runtime.commands import generate

    monkeypatch.setattr(generate, "_open", lambda *a: pytest.fail("the decoder was opened"))
    assert main(["--model", str(request.getfixturevalue(fixture)), *argv]) == 2
    assert_one_line_error(capsys, "generate", message)
