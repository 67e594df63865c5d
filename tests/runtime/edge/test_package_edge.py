"""Edge bundles: every board and JetPack, manifest hashes, budgets that add up, sizing to fit,
refusals with their numbers, and nothing half-written."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from models.precision import precision
from models.presets import preset
from runtime.edge import bundle as bundle_module
from runtime.edge.budget import GIB, MIB, Axes, fit_budget, memory_budget
from runtime.edge.package import package_edge, plan_bundle
from runtime.edge.targets import JETPACKS, TARGETS, EdgeError

GOLDEN = Path(__file__).parent / "golden"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("jetpack", sorted(JETPACKS))
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_board_and_jetpack_gets_a_checked_bundle(tmp_path, tiny_int4_export, target, jetpack):
    graph = tiny_int4_export[0]
    folder = package_edge(graph, target, jetpack, tmp_path / "bundle") and tmp_path / "bundle"
    manifest = json.loads((folder / "manifest.json").read_text())
    written = sorted(p.name for p in folder.iterdir())
    assert written == sorted(["README.md", "build.sh", "manifest.json", "trtexec.txt", graph.name])
    assert manifest["files"] == {name: _sha256(folder / name) for name in written if name != "manifest.json"}
    assert (folder / graph.name).read_bytes() == graph.read_bytes()
    release = JETPACKS[jetpack]
    assert (manifest["target"]["name"], manifest["compute_capability"]) == (target, "8.7")
    assert (manifest["tensorrt"], manifest["cuda"], manifest["l4t"]) == (release.tensorrt, release.cuda, release.l4t)
    assert manifest["graph"]["quantization"]["scheme"] == "int4" and manifest["checks"]["errors"] == []
    opset_warning = any("newer than opset 20" in w and "unconfirmed" in w for w in manifest["checks"]["warnings"])
    assert opset_warning == (jetpack == "6.2")  # int4 needs opset 21; TensorRT 10.3's parser documents 20
    budget = manifest["budget"]
    assert sum(budget["bytes"].values()) == budget["total_bytes"] <= budget["usable_bytes"]
    assert budget["usable_gib"] == pytest.approx(TARGETS[target].usable_gib)
    assert os.access(folder / "build.sh", os.X_OK)
    assert manifest["commands"]["trtexec"] == (folder / "trtexec.txt").read_text().strip()
    assert manifest["commands"]["build_engine"] in (folder / "build.sh").read_text()
    readme = (folder / "README.md").read_text()
    assert "unconfirmed" in readme and manifest["commands"]["parity"][1] in readme  # vs fake-quantized and float


def test_the_budget_adds_up_to_the_formulas(tiny_config):
    c, axes = tiny_config, Axes((1, 2, 4), (1, 64, 256), (0, 64, 512))
    budget = memory_budget(c, precision("fp16"), 1000, axes, 256, 8.0)
    lines = budget.lines
    assert lines["cache outputs"] == 2 * c.depth * 4 * c.kv_heads * (256 + 512) * c.dim_head * 2
    assert lines["cache inputs"] == 2 * c.depth * 4 * c.kv_heads * 512 * c.dim_head * 2
    assert lines["logits"] == 4 * 256 * c.num_tokens * 4 and lines["workspace"] == 256 * MIB
    live = 4 * c.dim + c.dim_inner + 2 * c.dim_kv_inner + c.ff_hidden
    assert lines["activations"] == 4 * 256 * live * 2 + 2 * 4 * c.heads * 256 * (256 + 512) * 4
    assert lines["weights"] == lines["weights copy"] == 1000 and budget.total == sum(lines.values())


def test_workspace_shrinks_first_then_the_axes_not_given():
    small, row = preset("small"), precision("fp16")
    axes = Axes((1, 1, 8), (1, 128, 1024), (0, 128, 1024))
    full = memory_budget(small, row, 268 * 10**6, axes, 1024, 64).total / GIB
    budget = fit_budget(small, row, 268 * 10**6, axes, full - 0.6)  # 0.6 GiB short: the workspace gives it
    assert budget.fits and budget.workspace_mib == 256 and budget.adjusted == ("workspace 1024 -> 256 MiB",)
    budget = fit_budget(small, row, 268 * 10**6, axes, 3.0, fixed=frozenset({"sequence"}))
    assert budget.fits and budget.workspace_mib == 128 and budget.axes.sequence == (1, 128, 1024)
    assert budget.axes.batch[2] < 8 and budget.adjusted[1].startswith("batch 1:1:8 ->")


def test_a_model_too_large_for_the_board_is_refused_with_its_numbers():
    small = preset("small")  # fp16 weights and embedding: about 268 MB
    axes = Axes((1, 32, 64), (1, 2048, 8192), (0, 2048, 8192))
    with pytest.raises(EdgeError) as error:
        fit_budget(small, precision("fp16"), 268 * 10**6, axes, TARGETS["orin-nano-8gb"].usable_gib,
                   fixed=frozenset({"batch", "sequence", "past"}), where="orin-nano-8gb")
    message = str(error.value)
    assert message.startswith("the model does not fit orin-nano-8gb: at batch 64, sequence 8192, past 8192 it needs")
    assert "cache outputs 36.00" in message and "logits 62.50" in message and "5.40 GiB is usable" in message


def test_refusals_write_nothing(tmp_path, tiny_int4_export, tiny_static_onnx, monkeypatch):
    graph = tiny_int4_export[0]
    with pytest.raises(EdgeError, match="does not fit orin-nano-8gb"):
        package_edge(graph, "orin-nano-8gb", "6.2", tmp_path / "a", {"batch": "1:64:4096", "sequence": "1:1:65536"})
    with pytest.raises(EdgeError, match=r"runs on ONNX Runtime only .*: export-model --static-cache N --portable "
                                        r"\(the same static cache in standard ops\) or export-model --with-past"):
        package_edge(tiny_static_onnx, "orin-agx-64gb", "7.2", tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "old").write_text("x")
    with pytest.raises(EdgeError, match="already exists"):
        package_edge(graph, "orin-agx-64gb", "7.2", tmp_path / "c")

    def broken(plan):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "bundle_readme", broken)
    with pytest.raises(OSError):
        package_edge(graph, "orin-agx-64gb", "7.2", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no bundle, no staging folder


def test_the_trtexec_line_matches_the_golden_file(tiny_int4_export):
    plan = plan_bundle(tiny_int4_export[0], "orin-nano-8gb", "6.2",
                       {"batch": "1:1:4", "sequence": "1:64:256", "past_sequence": "0:64:256"}, workspace_mib=256)
    line = " ".join(plan.trtexec_args())
    assert line == (GOLDEN / "trtexec-tiny-int4-past.txt").read_text().strip()
    assert plan.parity_commands()[0] == ("check-parity model-int4.engine --backend tensorrt --batch 1,3 "
                                         "--seq 1,17,64 --past 1,129 --generate 32")


def test_the_parity_command_of_a_static_graph_fits_its_window(tiny_portable_static_onnx, tiny_model, tiny_source,
                                                               tmp_path):
    """Portable static graphs of 96 and 24 tokens: the parity line's prompts leave room for the
    sweep's 8 decode steps (check-parity refuses --seq past the window - 8), and --generate's steps
    fit after its 8-token prompts."""
    from export.onnx_export import export_onnx
    from runtime.commands.check_parity import _check_static_lengths

    small = tmp_path / "p24.onnx"
    export_onnx(tiny_model, small, weights=tiny_source.record, static_cache=24, log=lambda _: None)
    for graph, window, generated in ((tiny_portable_static_onnx, 96, "32"), (small, 24, "16")):
        command = plan_bundle(graph, "orin-nano-8gb", "6.2").parity_commands()[0]
        seq = [int(v) for v in command.split("--seq ")[1].split()[0].split(",")]
        assert max(seq) == window - 8 and 1 in seq, command
        assert command.split("--generate ")[1].split()[0] == generated, command
        _check_static_lengths(seq, window)


def test_build_sh_checks_the_files_then_builds_with_trtexec_where_build_engine_is_missing(tmp_path, tiny_int4_export):
    import subprocess
    import sys

    plan = package_edge(tiny_int4_export[0], "orin-nx-16gb", "7.2", tmp_path / "bundle")
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "python3").symlink_to(sys.executable)
    fake = tools / "trtexec"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/called"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tools}:/usr/bin:/bin", "TRTEXEC": str(fake)}
    run = subprocess.run(["bash", str(tmp_path / "bundle" / "build.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tools / "called").read_text().split() == plan.trtexec_args()[1:]
    assert plan.parity_commands()[1] in run.stdout and "building with trtexec" in run.stderr
    with open(tmp_path / "bundle" / "trtexec.txt", "a") as handle:
        handle.write("--fp16\n")
    run = subprocess.run(["bash", str(tmp_path / "bundle" / "build.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 1 and "files changed since packing: ['trtexec.txt']" in run.stderr
