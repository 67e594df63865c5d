"""The exported ONNX graph: opset, symbolic axes, metadata, checker, ORT parity, lint, opsets."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export import onnx_export
from export.lint import lint_graph
from export.onnx_export import ExportError, export_onnx
from export.opset import MAX_OPSET, MIN_OPSET, OpsetError, check_requested_opset, lower_opset
from models.config import ModelConfig
from models.signature import graph_signature


@pytest.fixture(scope="module")
def tiny_proto(tiny_onnx):
    return onnx.load(str(tiny_onnx))


@pytest.fixture(scope="module")
def tiny_session(tiny_onnx):
    import onnxruntime as ort

    return ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])


def feeds(vocab: int, batch: int, seq: int, seed: int = 0, pad: int = 0):
    rng = np.random.default_rng([seed, batch, seq])
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    if pad:
        mask[1::2, :pad] = 0
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


# --------------------------------------------------------------------------- the graph file

def test_default_domain_opset_is_17(tiny_proto):
    default = [o.version for o in tiny_proto.opset_import if o.domain in ("", "ai.onnx")]
    assert default == [17]


def test_io_dims_are_symbolic(tiny_proto, tiny_config):
    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: v for v in tiny_proto.graph.input}
    outputs = {v.name: v for v in tiny_proto.graph.output}
    assert list(inputs) == ["input_ids", "attention_mask"]
    assert list(outputs) == ["logits"]
    for name in inputs:
        assert dims(inputs[name]) == ["batch", "sequence"]
        assert inputs[name].type.tensor_type.elem_type == TensorProto.INT64
    assert dims(outputs["logits"]) == ["batch", "sequence", tiny_config.num_tokens]
    assert outputs["logits"].type.tensor_type.elem_type == TensorProto.FLOAT


@pytest.mark.parametrize("max_seq_len, opt", [(200, 128), (64, 64)])
def test_declared_axes_stop_at_max_seq_len(tiny_config, max_seq_len, opt):
    """A model trained on max_seq_len tokens declares no sequence (nor cache) range past it, so
    build-engine builds no profile it cannot use; the batch axis is untouched."""
    from export.onnx_export import graph_metadata
    from models.transformer import build_model

    config = tiny_config.replace(max_seq_len=max_seq_len)
    for with_past in (False, True):
        axes = graph_metadata(build_model(config), graph_signature(config, with_past), 17, "fp32", None).axes
        sequences = ["sequence", "past_sequence"] if with_past else ["sequence"]
        assert sorted(axes) == sorted(["batch", *sequences])
        assert {name: axes[name]["max"] for name in sequences} == dict.fromkeys(sequences, max_seq_len)
        assert {name: axes[name]["opt"] for name in sequences} == dict.fromkeys(sequences, opt)
        assert axes["batch"] == {"min": 1, "opt": 1, "max": 8}
    unbounded = graph_metadata(build_model(tiny_config), graph_signature(tiny_config, True), 17, "fp32", None).axes
    assert unbounded["sequence"]["max"] == unbounded["past_sequence"]["max"] == 1024


def test_metadata_props(tiny_proto, tiny_model, tiny_source):
    props = {p.key: p.value for p in tiny_proto.metadata_props}
    assert ModelConfig.from_json(props["model_config"]) == tiny_model.config
    assert props["checkpoint_sha256"] == tiny_source.sha256 and len(props["checkpoint_sha256"]) == 64
    assert props["torch_version"] == torch.__version__
    assert "torch.onnx" in props["exporter"] and torch.__version__ in props["exporter"]
    assert props["opset"] == "17"
    assert props["precision"] == "float32"
    assert props["source_preset"] == "tiny" and props["source_seed"] == "0"
    axes = json.loads(props["axes"])
    assert set(axes) == {"batch", "sequence"}


def test_checker_full_check(tiny_onnx, tiny_proto):
    onnx.checker.check_model(str(tiny_onnx), full_check=True)
    onnx.checker.check_model(tiny_proto, full_check=True)


def test_exported_graph_is_lint_clean(tiny_proto, tiny_config, tiny_export_example_sequence):
    report = lint_graph(tiny_proto, graph_signature(tiny_config), {"sequence": tiny_export_example_sequence})
    assert report.findings == [] and bool(report)
    assert not any(node.op_type in ("If", "Loop", "Scan", "SplitToSequence", "Split") for node in tiny_proto.graph.node)


def test_example_sequence_is_37_for_tiny(tiny_export_example_sequence, tiny_config):
    assert tiny_export_example_sequence == 37
    taken = {tiny_config.dim, 37}
    assert onnx_export._example_size(37, taken) == 41  # skips a config dimension, then 38..40


# --------------------------------------------------------------------------- ORT vs PyTorch

def _shapes(example):
    return [(1, 1), (3, 1), (1, 19), (3, 19), (1, 5), (3, 53), (1, 4 * example), (3, 4 * example)]


def test_onnxruntime_matches_pytorch(tiny_session, tiny_model, tiny_export_example_sequence):
    vocab = tiny_model.config.num_tokens
    for batch, seq in _shapes(tiny_export_example_sequence):
        ids, mask = feeds(vocab, batch, seq)
        (got,) = tiny_session.run(None, {"input_ids": ids, "attention_mask": mask})
        want = torch_logits(tiny_model, ids, mask)
        assert got.shape == (batch, seq, vocab) and got.dtype == np.float32
        err = np.abs(got - want).max()
        assert err <= 1e-4, f"{batch}x{seq}: max abs {err:.3e}"


def test_onnxruntime_matches_pytorch_with_left_padding(tiny_session, tiny_model, tiny_export_example_sequence):
    seq = 4 * tiny_export_example_sequence
    ids, mask = feeds(tiny_model.config.num_tokens, 3, seq, seed=1, pad=seq // 3)
    (got,) = tiny_session.run(None, {"input_ids": ids, "attention_mask": mask})
    want = torch_logits(tiny_model, ids, mask)
    assert np.abs(got - want).max() <= 1e-4
    # a fully masked row is finite in the graph too
    mask[0] = 0
    (got,) = tiny_session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert np.isfinite(got).all()


def test_upstream_export_matches(upstream_onnx, upstream_model, upstream_reference):
    import onnxruntime as ort

    path, project_model = upstream_onnx
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert "source_preset" not in props and len(props["checkpoint_sha256"]) == 64
    for batch, seq in [(1, 1), (3, 19), (2, 148)]:
        ids, mask = feeds(64, batch, seq, seed=2)
        (got,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
        want = upstream_reference(upstream_model, torch.from_numpy(ids)).numpy()
        assert np.abs(got - want).max() <= 1e-4
        assert np.abs(got - torch_logits(project_model, ids, mask)).max() <= 1e-4


# --------------------------------------------------------------------------- lint

def _graph(nodes, initializers=(), inputs=None):
    inputs = inputs if inputs is not None else [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 256])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _if_node():
    branch_out = helper.make_tensor_value_info("branch", TensorProto.FLOAT, [1])
    const = lambda v: helper.make_node("Constant", [], ["branch"], value=numpy_helper.from_array(np.array([v], np.float32)))  # noqa: E731
    then_graph = helper.make_graph([const(1.0)], "then", [], [branch_out])
    else_graph = helper.make_graph([const(0.0)], "else", [], [branch_out])
    return helper.make_node("If", ["cond"], ["chosen"], name="the_if", then_branch=then_graph, else_branch=else_graph)


SIGNATURE = graph_signature(ModelConfig(num_tokens=256, dim=64, depth=2, dim_head=16, heads=4, kv_heads=2))
EXAMPLES = {"sequence": 37}


def test_lint_clean_graph_has_no_findings():
    add = helper.make_node("Add", ["a", "b"], ["c"], name="add")
    weight = numpy_helper.from_array(np.zeros((64, 36), np.float32), "weight")
    report = lint_graph(_graph([add], [weight]), SIGNATURE, EXAMPLES)
    assert report.findings == [] and bool(report)
    assert report.op_counts == {"Add": 1}
    assert "no findings" in report.format()


def test_lint_flags_control_flow():
    report = lint_graph(_graph([_if_node()]), SIGNATURE, EXAMPLES)
    assert len(report.findings) == 1 and "If" in report.findings[0] and "the_if" in report.findings[0]
    assert not report


def test_lint_does_not_take_an_axis_for_a_frozen_size():
    """Slice's axes input [3] (the last axis of (b, h, n, d)) equals a traced size of 3 by chance."""
    axes = numpy_helper.from_array(np.array([3], np.int64), "axes")
    starts, ends = (numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "starts"), (8, "ends")))
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="half")
    assert lint_graph(_graph([node], [axes, starts, ends]), SIGNATURE, {"logits_positions": 3}).findings == []
    shape = helper.make_node("Reshape", ["x", "axes"], ["z"], name="reshape")  # used as a size too: flagged
    assert len(lint_graph(_graph([node, shape], [axes, starts, ends]), SIGNATURE, {"logits_positions": 3}).findings) == 1


def test_lint_flags_sequence_ops():
    node = helper.make_node("SequenceConstruct", ["a", "b"], ["seq"], name="seq_node")
    report = lint_graph(_graph([node]), SIGNATURE, EXAMPLES)
    assert len(report.findings) == 1 and "SequenceConstruct" in report.findings[0]


def test_lint_flags_constant_sized_by_the_example():
    table = numpy_helper.from_array(np.zeros((1, 37, 16), np.float32), "rotary_table")
    report = lint_graph(_graph([], [table]), SIGNATURE, EXAMPLES)
    assert len(report.findings) == 1
    assert "rotary_table" in report.findings[0] and "37" in report.findings[0] and "sequence" in report.findings[0]
    # a Constant node and an int64 shape constant holding 37 are caught too
    const = helper.make_node("Constant", [], ["frozen_mask"],
                             value=numpy_helper.from_array(np.zeros((37, 37), np.float32)))
    shape = numpy_helper.from_array(np.array([2, 37, 64], np.int64), "shape")
    report = lint_graph(_graph([const], [shape]), SIGNATURE, EXAMPLES)
    assert len(report.findings) == 2
    assert any("frozen_mask" in f for f in report.findings) and any("shape" in f for f in report.findings)


def test_lint_flags_fixed_io_dimension():
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])]
    report = lint_graph(_graph([], inputs=inputs), SIGNATURE, EXAMPLES)
    assert len(report.findings) == 1 and "input_ids dimension 0" in report.findings[0]


def test_lint_all_findings_together():
    seq = helper.make_node("SequenceConstruct", ["a"], ["s"], name="s")
    table = numpy_helper.from_array(np.zeros((37, 8), np.float32), "t")
    report = lint_graph(_graph([_if_node(), seq], [table]), SIGNATURE, EXAMPLES)
    assert len(report.findings) == 3
    assert report.to_dict()["findings"] == report.findings


# --------------------------------------------------------------------------- opsets

@pytest.mark.parametrize("opset", [16, 99, 0])
def test_unsupported_opsets_are_refused(opset):
    with pytest.raises(OpsetError) as info:
        check_requested_opset(opset)
    message = str(info.value)
    assert f"opset {opset} is not supported" in message
    assert f"{MIN_OPSET} to {MAX_OPSET}" in message


@pytest.mark.parametrize("opset", [17, 18, MAX_OPSET])
def test_supported_opsets_are_accepted(opset):
    check_requested_opset(opset)


def test_export_refuses_opset_16_before_tracing(tiny_model, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("traced although the opset is unsupported")

    monkeypatch.setattr(onnx_export, "trace_to_onnx", boom)
    with pytest.raises(OpsetError, match="17 to"):
        export_onnx(tiny_model, tmp_path / "m.onnx", opset=16, log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def _opset18_model(op: str):
    if op == "Split":
        node = helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=0)
        outputs = ["a", "b"]
    else:
        node = helper.make_node("Add", ["x", "x"], ["a"])
        outputs = ["a"]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2 if op == "Split" else 4]) for o in outputs],
        initializer=[numpy_helper.from_array(np.array([2, 2], np.int64), "sizes")] if op == "Split" else [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_lower_opset_refuses_split():
    with pytest.raises(OpsetError, match=r"cannot express the graph at opset 17: ops \['Split'\]"):
        lower_opset(_opset18_model("Split"), 17)


def test_lower_opset_relabels_unchanged_ops():
    lowered = lower_opset(_opset18_model("Add"), 17)
    assert [o.version for o in lowered.opset_import if o.domain == ""] == [17]
    onnx.checker.check_model(lowered, full_check=True)


# --------------------------------------------------------------------------- failures leave nothing

@pytest.fixture
def reuse_trace(monkeypatch, tiny_onnx, tiny_export_example_sequence):
    """Make export_onnx skip tracing: trace_to_onnx returns (a copy of) the session's export."""
    calls = []

    def fake_trace(model, opset, dtype, *args, **kwargs):
        calls.append((opset, dtype))
        proto = onnx.load(str(tiny_onnx))
        return proto, graph_signature(model.config), {"sequence": tiny_export_example_sequence}

    monkeypatch.setattr(onnx_export, "trace_to_onnx", fake_trace)
    return calls


def test_failed_verification_leaves_no_file(tmp_path, tiny_model, reuse_trace):
    seen = []

    def verify(path):
        seen.append((path, path.exists(), path.stat().st_size))
        raise ExportError("verification failed: on purpose")

    with pytest.raises(ExportError, match="on purpose"):
        export_onnx(tiny_model, tmp_path / "model.onnx", verify=verify, log=lambda *_: None)
    assert reuse_trace == [(17, "fp32")]
    assert seen and seen[0][1] and seen[0][2] > 0  # verify saw the written temporary file
    assert tmp_path in seen[0][0].parents and seen[0][0].parent != tmp_path  # a hidden staging folder
    assert os.listdir(tmp_path) == []


def test_passing_verification_writes_the_file(tmp_path, tiny_model, reuse_trace):
    seen = []
    result = export_onnx(tiny_model, tmp_path / "model.onnx", verify=seen.append, log=lambda *_: None)
    assert len(seen) == 1 and result.path == tmp_path / "model.onnx"
    assert os.listdir(tmp_path) == ["model.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    assert result.path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_lint_findings_refuse_export_and_leave_no_file(tmp_path, tiny_model, monkeypatch, tiny_onnx):
    def frozen_trace(model, opset, dtype, *args, **kwargs):
        proto = onnx.load(str(tiny_onnx))
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros((37, 16), np.float32), "rotary_cache"))
        return proto, graph_signature(model.config), {"sequence": 37}

    monkeypatch.setattr(onnx_export, "trace_to_onnx", frozen_trace)
    with pytest.raises(ExportError, match="export lint found 1 problem.*rotary_cache.*--allow-lint"):
        export_onnx(tiny_model, tmp_path / "model.onnx", log=lambda *_: None)
    assert os.listdir(tmp_path) == []
    result = export_onnx(tiny_model, tmp_path / "model.onnx", allow_lint=True, log=lambda *_: None)
    assert len(result.lint.findings) == 1 and os.listdir(tmp_path) == ["model.onnx"]


@pytest.mark.parametrize("kind", ["parent-is-file", "parent-missing", "output-is-dir"])
def test_bad_output_paths(tmp_path, tiny_model, kind, reuse_trace):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    output = {"parent-is-file": tmp_path / "afile" / "m.onnx", "parent-missing": tmp_path / "no" / "m.onnx",
              "output-is-dir": tmp_path / "adir"}[kind]
    with pytest.raises(ExportError, match="cannot write"):
        export_onnx(tiny_model, output, log=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["adir", "afile"] and os.listdir(tmp_path / "adir") == []
    assert reuse_trace == []


def test_unknown_precision_is_refused(tmp_path, tiny_model, reuse_trace):
    from models.precision import PrecisionError

    with pytest.raises(PrecisionError, match="unknown precision 'int8'; choose one of fp32, fp16, bf16"):
        export_onnx(tiny_model, tmp_path / "m.onnx", precision="int8", log=lambda *_: None)


def test_failed_reexport_keeps_the_previous_external_data_export(tmp_path, tiny_model, reuse_trace, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(onnx_export, "INLINE_GRAPH_BYTES", 0)  # tiny graph behaves like a >2 GB one
    output = tmp_path / "model.onnx"
    export_onnx(tiny_model, output, log=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]

    def failing(path):
        raise ExportError("verification failed: on purpose")

    with pytest.raises(ExportError):
        export_onnx(tiny_model, output, verify=failing, log=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])  # the earlier export still loads


def test_half_rotary_pairing_exports_at_opset_17_and_matches_pytorch(tiny_config, tmp_path):
    """rotate_pairs slices instead of chunking: chunk traced to Split, which opset 17 could not
    express here, so a half-paired model (as Llama checkpoints pair) needed --opset 18."""
    from export.onnx_export import export_onnx
    from models.transformer import build_model
    from runtime.verify.exported import verify_export

    model = build_model(tiny_config.replace(rotary_pairing="half"), seed=2)
    path = tmp_path / "half.onnx"
    result = export_onnx(model, path, opset=17, with_past=True, log=lambda _: None)
    assert result.opset == 17
    assert verify_export(path, model, log=lambda _: None, with_past=True)
