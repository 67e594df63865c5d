"""Verification that scales: the whole model when it fits, else a depth-truncated copy of the same
weights (said so in the log and the report), else a refusal before any export work."""
from __future__ import annotations

import json

import pytest

from models.precision import precision
from models.presets import preset
from models.transformer import build_model
from models.weights import ModelWeights
from runtime.resources import ResourceError
from runtime.verify import plan as plan_module
from runtime.verify.plan import plan_verification, verification_bytes

DEEP = {"depth": 4}


@pytest.fixture(scope="module")
def deep_weights():
    return ModelWeights.of(build_model(preset("tiny").replace(**DEEP), 0))


def test_the_plan_is_the_whole_model_when_it_fits_else_two_layers_else_a_refusal(deep_weights):
    row = precision("fp16")
    whole = verification_bytes(deep_weights.parameter_count(), row)
    two = verification_bytes(deep_weights.truncated(2).parameter_count(), row)
    assert two < whole
    assert plan_verification(deep_weights, row, have=whole).full
    truncated = plan_verification(deep_weights, row, have=whole - 1)
    assert (truncated.layers, truncated.depth, truncated.full) == (2, 4, False)
    assert "depth-truncated copy of the same weights (2 of 4 layers)" in truncated.describe()
    with pytest.raises(ResourceError, match="cannot verify this export: even a 2-layer copy .* pass --no-verify"):
        plan_verification(deep_weights, row, have=two - 1)


def test_a_truncated_copy_shares_the_tensors_of_its_first_layers(deep_weights):
    small = deep_weights.truncated(2)
    assert small.config.depth == 2
    assert sorted(small.tensors) == sorted(n for n in deep_weights.tensors if not n.startswith(("layers.2.", "layers.3.")))
    assert small.tensors["layers.1.ff.proj_in.weight"].equal(deep_weights.tensors["layers.1.ff.proj_in.weight"])


@pytest.mark.parametrize("kind", [[], ["--static-cache", "48"]], ids=["traced", "groupqueryattention-static"])
def test_export_model_verifies_a_truncated_copy_when_the_whole_model_does_not_fit(tmp_path, monkeypatch, capsys,
                                                                                   deep_weights, kind):
    """Every graph kind: the truncated copy goes through the same writer (export_graph)."""
    from runtime.commands import export_model

    whole = verification_bytes(deep_weights.parameter_count(), precision("fp32"))
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: (whole - 1) / plan_module.HEADROOM)
    report = tmp_path / "r.json"
    code = export_model.main(["--config", json.dumps(DEEP), "--output", str(tmp_path / "m.onnx"), "--json", str(report),
                              *kind])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "verifying: ONNX Runtime (CPU) against PyTorch on a depth-truncated copy of the same weights " \
           "(2 of 4 layers)" in out
    data = json.loads(report.read_text())
    assert data["verify_scope"]["mode"] == "depth-truncated" and data["verify_scope"]["layers"] == 2
    assert data["verify"]["passed"] is True and data["config"]["depth"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json"]  # the scratch export is gone


def test_export_model_refuses_before_exporting_when_not_even_a_truncated_copy_fits(tmp_path, monkeypatch, capsys):
    from export import onnx_export
    from runtime.commands import export_model

    monkeypatch.setattr(plan_module, "available_bytes", lambda device: 1000)
    monkeypatch.setattr(onnx_export, "trace_to_onnx", lambda *a, **k: pytest.fail("traced"))
    code = export_model.main(["--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code != 0 and "cannot verify this export" in err and "--no-verify" in err
    assert list(tmp_path.iterdir()) == []


def test_a_bf16_static_graph_is_not_verified_on_the_cpu_and_says_why(tiny_portable_static_onnx, tiny_model):
    """As with a bf16 graph with past: ONNX Runtime's CPU provider has no bfloat16 MatMul, so the
    export skips its verification with the reason (it had failed to load the graph, naming a
    staging path). The graph here is the fp32 one relabelled bf16: the check reads only the label."""
    import onnx

    from runtime.verify.exported import verify_static_export

    proto = onnx.load(str(tiny_portable_static_onnx))
    for prop in proto.metadata_props:
        if prop.key == "precision":
            prop.value = "bfloat16"
    said = []
    assert verify_static_export(proto.SerializeToString(), tiny_model, 96, log=said.append) is None
    assert said == ["verify skipped: ONNX Runtime's CPU provider cannot run bfloat16 MatMul; verify on a GPU with "
                    "check-parity --backend onnxruntime-cuda"]
