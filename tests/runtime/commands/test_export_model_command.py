"""`export-model` in-process: exit codes, one-line errors, files written and never half-written."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

from command_helpers import assert_one_line_error, perturb_embedding
from export import onnx_export
from runtime.commands import export_model as export_cli


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


def test_static_cache_export_writes_a_verified_graph(tmp_path):
    path = tmp_path / "static.onnx"
    assert export_cli.main(["--static-cache", "96", "--output", str(path), "--json", str(tmp_path / "e.json")]) == 0
    exported = json.loads((tmp_path / "e.json").read_text())
    assert exported["kind"] == "onnxruntime-static-cache" and exported["verify"]["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "static.onnx"]


def test_static_cache_with_past_is_refused_before_any_work(tmp_path, capsys, no_trace):
    assert export_cli.main(["--static-cache", "8", "--with-past", "--output", str(tmp_path / "x.onnx")]) == 2
    assert_one_line_error(capsys, "export-model", "drop --with-past")
    assert not (tmp_path / "x.onnx").exists()


def test_portable_static_cache_export_writes_a_verified_standard_ops_graph(tmp_path):
    path = tmp_path / "portable.onnx"
    assert export_cli.main(["--static-cache", "64", "--portable", "--output", str(path),
                            "--json", str(tmp_path / "e.json")]) == 0
    exported = json.loads((tmp_path / "e.json").read_text())
    assert exported["kind"] == "static-cache-portable" and exported["verify"]["passed"]
    assert exported["lint"]["findings"] == [] and exported["opset"] == 17


def test_portable_without_a_window_is_refused(tmp_path, capsys, no_trace):
    assert export_cli.main(["--portable", "--output", str(tmp_path / "x.onnx")]) == 2
    assert_one_line_error(capsys, "export-model", "give its window with --static-cache N")


# --------------------------------------------------------------------------- export-model --quantize

def test_quantized_export_reports_its_scheme_opset_and_weight_bytes(tiny_int4_export, tiny_onnx):
    from export.onnx_export import graph_weight_bytes

    path, report = tiny_int4_export
    assert report["precision"] == "fp32-int4-b32" and report["opset"] == 21 and report["lint"]["findings"] == []
    assert report["verify"]["passed"] and report["verify"]["precision"] == "float32"  # the tight fp32 row
    assert all(case["max_abs"] <= 1e-4 for case in report["verify"]["cases"])
    assert report["weight_bytes"] == graph_weight_bytes(path) < 0.6 * graph_weight_bytes(tiny_onnx)
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain == ""] == [21] and proto.ir_version >= 10


@pytest.mark.parametrize("flags, fragments", [
    (["--quantize", "int4", "--opset", "17"], ("needs opset 21 or newer", "pass --opset 21 or leave --opset out")),
    (["--quantize", "int8", "--dtype", "fp16", "--opset", "18"], ("needs opset 19 or newer",)),
    (["--quantize", "int8", "--block-size", "32"], ("one scale per output channel", "drop --block-size")),
    (["--quantize", "int4", "--block-size", "128"], ("--block-size 128 does not divide", "choose 32 or 64")),
    (["--quantize", "int4", "--block-size", "48"], ("block size of 32, 64, 128, not 48",)),
    (["--quantize", "int4", "--dtype", "bf16"], ("fp32 or fp16 activations, not bf16",)),
    (["--block-size", "32"], ("--block-size applies to --quantize",)),
])
def test_impossible_quantization_is_one_line_before_any_work(capsys, out_dir, no_trace, flags, fragments):
    assert export_cli.main([*flags, "--output", str(out_dir / "m.onnx")]) == 2
    assert_one_line_error(capsys, "export-model", *fragments)
    assert os.listdir(out_dir) == []


def test_quantized_static_cache_export_is_verified_against_the_ort_formula(tmp_path):
    path = tmp_path / "static-int4.onnx"
    assert export_cli.main(["--static-cache", "64", "--quantize", "int4", "--dtype", "fp16", "--output", str(path),
                            "--json", str(tmp_path / "e.json")]) == 0
    exported = json.loads((tmp_path / "e.json").read_text())
    assert exported["precision"] == "fp16-int4-b32" and exported["verify"]["passed"]
    assert exported["verify"]["precision"] == "float16"  # the tight row of the activations
