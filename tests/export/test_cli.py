"""`export-model` and `check-parity` run in-process: exit codes, one-line errors, files written."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export import cli as export_cli
from export import onnx_export
from runtime import parity_cli
from runtime.backends.torch_backend import TorchBackend
from runtime.parity import Case, check_parity


def assert_one_line_error(capsys, prog: str, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"{prog}: error:"), lines[0]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def perturb_embedding(proto, delta: float = 0.05) -> int:
    """Shift the graph's token embedding initializer in place; returns how many were changed."""
    changed = 0
    for init in proto.graph.initializer:
        if init.name.endswith("token_emb.weight"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + delta, init.name))
            changed += 1
    return changed


@pytest.fixture
def out_dir(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def no_trace(monkeypatch):
    """Error cases must fail before the (slow) trace; fail loudly if they get that far."""
    def boom(*args, **kwargs):
        raise AssertionError("export-model reached tracing in an error test")

    monkeypatch.setattr(onnx_export, "trace_to_onnx", boom)


# --------------------------------------------------------------------------- export-model errors

def test_missing_checkpoint(capsys, tmp_path, out_dir, no_trace):
    code = export_cli.main(["--checkpoint", str(tmp_path / "missing.pt"), "--output", str(out_dir / "m.onnx"),
                            "--json", str(out_dir / "r.json")])
    assert code != 0
    assert_one_line_error(capsys, "export-model", "checkpoint not found", "missing.pt")
    assert os.listdir(out_dir) == []


def test_corrupt_checkpoint(capsys, tmp_path, out_dir, no_trace):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(np.random.default_rng(1).bytes(2048))
    code = export_cli.main(["--checkpoint", str(bad), "--output", str(out_dir / "m.onnx")])
    assert code != 0
    assert_one_line_error(capsys, "export-model", "cannot read checkpoint")
    assert os.listdir(out_dir) == []


def test_truncated_safetensors_checkpoint(capsys, tmp_path, out_dir, no_trace, tiny_model):
    from models.checkpoints import save_checkpoint

    path = save_checkpoint(tiny_model, tmp_path / "t.safetensors")
    path.write_bytes(path.read_bytes()[:1000])
    assert export_cli.main(["--checkpoint", str(path), "--output", str(out_dir / "m.onnx")]) != 0
    assert_one_line_error(capsys, "export-model", "corrupt safetensors")
    assert os.listdir(out_dir) == []


def test_foreign_checkpoint(capsys, tmp_path, out_dir, no_trace):
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, foreign)
    code = export_cli.main(["--checkpoint", str(foreign), "--output", str(out_dir / "m.onnx")])
    assert code != 0
    assert_one_line_error(capsys, "export-model", "unrecognised checkpoint layout", "token_emb.weight",
                          "encoder.weight")
    assert os.listdir(out_dir) == []


def test_pickled_module_checkpoint(capsys, tmp_path, out_dir, no_trace, tiny_model):
    path = tmp_path / "module.pt"
    torch.save(tiny_model, path)
    assert export_cli.main(["--checkpoint", str(path), "--output", str(out_dir / "m.onnx")]) != 0
    assert_one_line_error(capsys, "export-model", "weights_only=True")
    assert os.listdir(out_dir) == []


def test_unsupported_opset(capsys, out_dir, no_trace):
    code = export_cli.main(["--opset", "16", "--output", str(out_dir / "m.onnx")])
    assert code != 0
    assert_one_line_error(capsys, "export-model", "opset 16 is not supported", "17 to")
    assert os.listdir(out_dir) == []


def test_output_parent_is_a_file(capsys, out_dir, no_trace):
    blocker = out_dir / "blocker"
    blocker.write_text("a regular file")
    code = export_cli.main(["--output", str(blocker / "m.onnx")])
    assert code != 0
    assert_one_line_error(capsys, "export-model", "is a file, not a directory")
    assert os.listdir(out_dir) == ["blocker"]
    assert blocker.read_text() == "a regular file"


def test_bad_config_argument(capsys, out_dir, no_trace):
    assert export_cli.main(["--config", '{"dim_head": 15}', "--output", str(out_dir / "m.onnx")]) != 0
    assert_one_line_error(capsys, "export-model", "dim_head must be even")
    assert os.listdir(out_dir) == []


def test_checkpoint_and_preset_together(capsys, tmp_path, out_dir, no_trace):
    code = export_cli.main(["--checkpoint", str(tmp_path / "x.pt"), "--preset", "tiny",
                            "--output", str(out_dir / "m.onnx")])
    assert code != 0
    assert_one_line_error(capsys, "export-model", "not both")


def test_failed_verification_is_one_line_and_leaves_nothing(capsys, monkeypatch, out_dir, tiny_onnx):
    """A graph that does not compute the model (different weights) fails verification."""
    def other_weights_trace(model, opset, dtype, *args, **kwargs):
        from models.signature import graph_signature

        proto = onnx.load(str(tiny_onnx))
        assert perturb_embedding(proto) == 1
        return proto, graph_signature(model.config), {"sequence": 37}

    monkeypatch.setattr(onnx_export, "trace_to_onnx", other_weights_trace)
    code = export_cli.main(["--output", str(out_dir / "m.onnx"), "--json", str(out_dir / "r.json")])
    assert code != 0
    assert_one_line_error(capsys, "export-model", "verification failed")
    assert os.listdir(out_dir) == []


# --------------------------------------------------------------------------- export-model success

def test_export_model_writes_graph_and_json(capsys, out_dir, tiny_source):
    model_path, json_path = out_dir / "model.onnx", out_dir / "export.json"
    code = export_cli.main(["--output", str(model_path), "--json", str(json_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    assert sorted(os.listdir(out_dir)) == ["export.json", "model.onnx"]  # no temporaries left
    report = json.loads(json_path.read_text())
    assert report["verify"]["passed"] is True
    assert len(report["verify"]["cases"]) >= 7
    assert all(case["passed"] and case["max_abs"] <= 1e-4 for case in report["verify"]["cases"])
    assert {c["case"]["sequence"] for c in report["verify"]["cases"]} >= {1, 148}
    assert report["opset"] == 17 and report["dtype"] == "fp32"
    assert report["checkpoint_sha256"] == tiny_source.sha256  # the default is the tiny preset, seed 0
    assert report["lint"]["findings"] == []
    assert report["config"] == tiny_source.model.config.to_dict()
    proto = onnx.load(str(model_path))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [17]


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
    assert_one_line_error(capsys, "check-parity", "not those", "sha256")
    assert not report_path.exists()


def test_check_parity_fails_on_a_tampered_graph(capsys, tiny_onnx, tmp_path):
    """Same recorded weights sha, but the graph's weights were changed after export: exit 1."""
    proto = onnx.load(str(tiny_onnx))
    assert perturb_embedding(proto) == 1
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
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


def test_parity_of_different_seeds_fails(tiny_config):
    from models.transformer import build_model

    with TorchBackend(build_model(tiny_config, 0)) as reference, TorchBackend(build_model(tiny_config, 1)) as other:
        report = check_parity(reference, other, [Case(1, 1), Case(2, 9), Case(2, 9, padded=True)])
    assert bool(report) is False
    worst = report.worst()
    assert not worst.passed and worst.case in {Case(1, 1), Case(2, 9), Case(2, 9, padded=True)}
    assert worst.max_abs > 1e-2 and "max abs" in worst.problem
    assert worst.case.label in report.summary() and "FAILED" in report.summary()


def test_unwritable_json_report_leaves_no_graph(capsys, monkeypatch, out_dir, tiny_onnx, tmp_path):
    def reuse(model, opset, dtype, *args, **kwargs):
        from models.signature import graph_signature

        return onnx.load(str(tiny_onnx)), graph_signature(model.config), {"sequence": 37}

    monkeypatch.setattr(onnx_export, "trace_to_onnx", reuse)
    code = export_cli.main(["--output", str(out_dir / "m.onnx"), "--no-verify",
                            "--json", str(tmp_path / "no-such-dir" / "r.json")])
    assert code != 0
    assert_one_line_error(capsys, "export-model", "no-such-dir")
    assert os.listdir(out_dir) == []
