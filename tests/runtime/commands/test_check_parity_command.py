"""`check-parity` in-process: verdicts, exit codes, reports and one-line errors."""
from __future__ import annotations

import json
import re

from command_helpers import assert_one_line_error, tampered_copy
from runtime.commands import check_parity as parity_cli


# --------------------------------------------------------------------------- check-parity

def test_check_parity_passes_on_the_good_model(capsys, tiny_onnx, tmp_path):
    report_path = tmp_path / "parity.json"
    code = parity_cli.main([str(tiny_onnx), "--json", str(report_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and report["precision"] == "float32"
    cases = report["cases"]
    labels = {(c["case"]["batch"], c["case"]["sequence"], c["case"]["padded"]) for c in cases}
    assert {(1, 1, False), (3, 1, False), (1, 17, False)} <= labels
    assert any(padded for _, _, padded in labels)
    for case in cases:
        assert case["passed"] and case["output"] == "logits"
        assert 0 <= case["max_abs"] <= 1e-4 and case["cosine"] >= 0.99999 and case["top1"] >= 0.99
    assert report["tolerance"]["atol"] == 1e-4
    assert report["worst"]["max_abs"] == max(c["max_abs"] for c in cases)


def seed_flag(parser) -> str:
    """The weight-seed option (named --seed at first, --init-seed since the KV-cache commit)."""
    for action in parser._actions:
        if action.dest == "seed" and action.option_strings:
            return action.option_strings[0]
    raise AssertionError("check-parity has no weight seed option")


def test_check_parity_refuses_other_seed(capsys, tiny_onnx, tmp_path):
    report_path = tmp_path / "parity.json"
    flag = seed_flag(parity_cli.build_parser())
    code = parity_cli.main([str(tiny_onnx), "--preset", "tiny", flag, "1", "--json", str(report_path)])
    assert code == 2
    assert_one_line_error(capsys, "check-parity", "are not the files", "sha256")
    assert not report_path.exists()


def test_check_parity_fails_on_a_tampered_graph(capsys, tiny_onnx, tmp_path):
    """Same recorded weights sha, but the graph's weights were changed after export: exit 1."""
    tampered = tampered_copy(tiny_onnx, tmp_path / "tampered.onnx")
    report_path = tmp_path / "parity.json"
    code = parity_cli.main([str(tampered), "--batch", "1,2", "--seq", "1,9", "--json", str(report_path)])
    assert code == 1
    assert_one_line_error(capsys, "check-parity", "parity FAILED")
    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    assert any(not c["passed"] and c["max_abs"] > 1e-4 for c in report["cases"])


def test_check_parity_on_checkpoint_export(capsys, upstream_onnx, upstream_checkpoint):
    path, _ = upstream_onnx
    assert parity_cli.main([str(path), "--batch", "2", "--seq", "1,9"]) == 2
    assert_one_line_error(capsys, "check-parity", "does not record a preset", "--checkpoint")
    code = parity_cli.main([str(path), "--checkpoint", str(upstream_checkpoint), "--batch", "2", "--seq", "1,9"])
    captured = capsys.readouterr()
    assert code == 0, captured.err


def test_check_parity_missing_model(capsys, tmp_path):
    assert parity_cli.main([str(tmp_path / "nope.onnx")]) == 2
    assert_one_line_error(capsys, "check-parity", "ONNX model not found")




def test_generate_flag_compares_greedy_tokens_with_pytorch(tiny_past_onnx, tmp_path):
    report = tmp_path / "parity.json"
    code = parity_cli.main([str(tiny_past_onnx), "--seq", "1,9", "--batch", "1,2", "--generate", "16",
                            "--json", str(report)])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["passed"] and data["generation"]["tokens_compared"] == 32
    assert data["generation"]["first_divergence"] is None
    assert any(c["case"]["past"] > 0 for c in data["cases"])


def test_text_prompts_set_the_rows_of_generate(tiny_past_onnx, tmp_path):
    report = tmp_path / "parity.json"
    code = parity_cli.main([str(tiny_past_onnx), "--seq", "1", "--batch", "1", "--generate", "8",
                            "--prompt", "def main():", "--prompt", "import os", "--prompt", "é",
                            "--json", str(report)])
    assert code == 0
    generation = json.loads(report.read_text())["generation"]
    assert generation["tokens_compared"] == 3 * 8 and generation["tokens_matched"] == 24


def test_bad_text_prompts_fail_before_any_parity_work(capsys, tiny_past_onnx):
    assert parity_cli.main([str(tiny_past_onnx), "--prompt", "x"]) == 2
    assert_one_line_error(capsys, "check-parity", "--prompt sets the prompts of --generate; add --generate N")
    assert parity_cli.main([str(tiny_past_onnx), "--generate", "4", "--prompt", ""]) == 2
    assert_one_line_error(capsys, "check-parity", "--prompt is empty")


def test_a_static_cache_graph_is_checked_through_its_decoder(tiny_static_onnx, tmp_path, capsys):
    report = tmp_path / "parity.json"
    assert parity_cli.main([str(tiny_static_onnx), "--seq", "1,9,33", "--generate", "16", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["passed"] and data["generation"]["tokens_matched"] == 32
    assert {c["output"] for c in data["cases"]} == {"logits (prompt)", "logits (8 decode steps)"}
    assert parity_cli.main([str(tiny_static_onnx), "--backend", "tensorrt"]) == 2
    assert_one_line_error(capsys, "check-parity", "static-cache graphs run on ONNX Runtime; tensorrt cannot run one")


# --------------------------------------------------------------------------- quantized graphs: two references

def test_a_quantized_graph_is_judged_against_its_fake_quantized_weights_by_default(capsys, tiny_int4_export, tmp_path):
    report_path = tmp_path / "parity.json"
    code = parity_cli.main([str(tiny_int4_export[0]), "--batch", "1,2", "--seq", "1,9", "--generate", "12",
                            "--json", str(report_path)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_path.read_text())
    assert report["tolerance"]["atol"] == 1e-4 and all(c["max_abs"] <= 1e-4 for c in report["cases"])
    assert report["generation"]["first_divergence"] is None  # fp32 activations: token for token
    assert "fake-quantized" in capsys.readouterr().out


def test_against_float_applies_the_scheme_row_and_reports_the_first_divergence(capsys, tiny_int4_export, tmp_path):
    report_path = tmp_path / "parity.json"
    code = parity_cli.main([str(tiny_int4_export[0]), "--against", "float", "--batch", "1,2", "--seq", "1,17",
                            "--generate", "32", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    tolerance, generation = report["tolerance"], report["generation"]
    assert tolerance["min_cosine"] == 0.95 and tolerance["min_forced_top1"] == 0.97
    assert generation["min_top1"] == 0.97 and generation["teacher_forced_top1"] is not None
    assert code == 0 and report["passed"] and min(c["cosine"] for c in report["cases"]) >= 0.99
    assert report["top1"] >= 0.75 and generation["teacher_forced_top1"] >= 0.97  # measured: 94 % and 98.4 %
    assert generation["first_divergence"]["step"] < 32  # int4 flips a near-tie of the random tiny model
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("check-parity:"))
    assert re.search(r", fp32-int4-b\d+ tolerance \(int4 weights against the float model\)$", header), header
    assert "float32 tolerance" not in header  # it named the activations' row while applying int4's


def test_a_graph_given_to_the_engine_backend_is_named_as_not_an_engine(capsys, tiny_onnx):
    """It used to complain that the engine sidecar MODEL.onnx.json was missing."""
    assert parity_cli.main([str(tiny_onnx), "--backend", "tensorrt"]) == 2
    assert_one_line_error(capsys, "check-parity", f"--backend tensorrt runs a TensorRT engine, and {tiny_onnx} is not "
                                                  "one", f"build-engine {tiny_onnx}", "--backend onnxruntime")


def test_a_failed_generation_comparison_is_written_to_the_report(capsys, tiny_past_onnx, tmp_path):
    """The JSON keeps a failed --generate's figures (it once wrote `generation: null` for them)."""
    tampered = tampered_copy(tiny_past_onnx, tmp_path / "tampered-past.onnx")
    report_path = tmp_path / "parity.json"
    code = parity_cli.main([str(tampered), "--batch", "1", "--seq", "1", "--past", "1", "--generate", "8",
                            "--json", str(report_path)])
    assert code == 1
    generation = json.loads(report_path.read_text())["generation"]
    assert generation["passed"] is False and generation["steps"]["positions"] == 16
    assert generation["steps"]["max_abs"] > 1e-3 and not generation["steps"]["passed"]


def test_generate_on_an_fp16_graph_with_past_judges_its_half_precision_steps(tiny_model, tiny_source, tmp_path):
    """An fp16 cache fed back step by step on ONNX Runtime's CPU provider: the forced steps pass the
    fp16 bars. (A decoder that lost its half-precision cache at every step fails here.)"""
    from export.onnx_export import export_onnx

    path = tmp_path / "tiny-fp16-past.onnx"
    export_onnx(tiny_model, path, precision="fp16", weights=tiny_source.record, with_past=True, log=lambda _: None)
    report_path = tmp_path / "parity.json"
    code = parity_cli.main([str(path), "--batch", "1", "--seq", "1", "--past", "1", "--generate", "24",
                            "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    generation = report["generation"]
    assert code == 0 and generation["passed"], generation
    assert report["precision"] == "float16" and generation["exact_tokens"] is False
    assert generation["steps"]["positions"] == 48 and generation["teacher_forced_top1"] >= 0.99
    assert generation["steps"]["max_abs"] < 0.05  # fp16 rounding on logits of about 1, within the row's bar
