"""`package-edge` in-process: the bundle and its JSON manifest, one-line refusals, nothing half-written."""
from __future__ import annotations

import json

from command_helpers import assert_one_line_error
from runtime.commands import package_edge as edge_cli


def test_package_edge_writes_the_bundle_and_prints_the_manifest(capsys, tmp_path, tiny_int4_export):
    out = tmp_path / "orin"
    code = edge_cli.main([str(tiny_int4_export[0]), "--target", "orin-nx-16gb", "--jetpack", "6.2", "--batch", "1:1:2",
                          "--seq", "1:32:128", "--past", "0:32:256", "--workspace", "512", "--output", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads(captured.out)  # --json without a path: the manifest on stdout, progress on stderr
    assert manifest.pop("provenance")["argv"][0] == "package-edge"  # the report says which command made it
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["budget"]["largest_profile"] == "batch 2, sequence 128, past 256"
    assert manifest["workspace_mib"] == 512 and manifest["budget"]["adjusted_to_fit"] == []
    assert manifest["profiles"][0]["input_ids"] == {"min": [1, 1], "opt": [1, 32], "max": [2, 128]}
    assert "--memPoolSize=workspace:512" in manifest["commands"]["trtexec"]
    assert "warning: " in captured.err and "wrote " in captured.err


def test_refusals_are_one_line_and_write_nothing(capsys, tmp_path, tiny_int4_export, tiny_onnx):
    graph = str(tiny_int4_export[0])
    cases = [
        ([graph, "--target", "orin-nano-8gb", "--jetpack", "7.2", "--batch", "1:8:512", "--seq", "1:1024:8192"],
         ("does not fit orin-nano-8gb", "GiB is usable", "cache outputs")),
        ([str(tiny_onnx), "--target", "orin-nano-8gb", "--jetpack", "7.2", "--past", "0:1:8"],
         ("--past applies to graphs with a key/value cache",)),
        ([graph, "--target", "orin-nano-8gb", "--jetpack", "7.2", "--seq", "8:4:2"], ("need min <= opt <= max",)),
        ([str(tmp_path / "missing.onnx"), "--target", "orin-nano-8gb", "--jetpack", "6.2"], ("ONNX model not found",)),
    ]
    for flags, fragments in cases:
        assert edge_cli.main([*flags, "--output", str(tmp_path / "out")]) == 2
        assert_one_line_error(capsys, "package-edge", *fragments)
        assert not (tmp_path / "out").exists()
