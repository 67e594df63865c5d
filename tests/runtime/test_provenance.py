"""Every result file says where it came from: commit, command line, device, versions, date, flags."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from runtime import provenance as prov
from runtime.commands.common import ArgumentParser, run_main, write_json

ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def _check_block(block: dict, command: list[str]) -> None:
    assert block["schema"] == prov.SCHEMA
    if (ROOT / ".git").exists() and prov.COMMIT_VARIABLE not in os.environ:
        assert block["commit"] == _git("rev-parse", "HEAD") and block["from"] == "git"
        assert block["dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert block["argv"] == command
    assert block["command"] == " ".join(command)
    when = datetime.fromisoformat(block["date"])
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 600
    assert block["device"]["cores"] >= 1 and block["device"]["cpu"]
    assert block["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert block["versions"]["numpy"]  # installed distributions, read from their metadata


def test_a_command_records_its_command_line_and_flags(tmp_path):
    parser = ArgumentParser(prog="tool")
    parser.add_argument("--json")
    parser.add_argument("--batch", type=int, default=3)
    target = tmp_path / "result.json"
    code = run_main(lambda args: write_json(args.json, {"figure": 1.5}) or 0, parser,
                    ["--json", str(target), "--batch", "7"])
    data = json.loads(target.read_text())
    assert code == 0 and data["figure"] == 1.5
    _check_block(data["provenance"], ["tool", "--json", str(target), "--batch", "7"])
    assert data["provenance"]["settings"] == {"json": str(target), "batch": 7}


def test_generate_json_carries_provenance(tiny_past_onnx, tmp_path):
    from runtime.commands.generate import main

    target = tmp_path / "gen.json"
    argv = ["--model", str(tiny_past_onnx), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json", str(target)]
    assert main(argv) == 0
    data = json.loads(target.read_text())
    _check_block(data["provenance"], ["generate", *argv])
    assert data["provenance"]["settings"]["max_new_tokens"] == 4
    assert "torch" in data["provenance"]["versions"]


def test_the_environment_names_the_commit_of_a_copied_tree(tmp_path, monkeypatch):
    """The accelerator gets a copy of the working tree whose .git may hold an older commit: the
    commit set in the environment wins over the checkout's."""
    monkeypatch.setenv(prov.COMMIT_VARIABLE, "abc123")
    monkeypatch.setenv(prov.DIRTY_VARIABLE, "1")
    assert prov.source_revision() == {"commit": "abc123", "dirty": True, "from": prov.COMMIT_VARIABLE}
    monkeypatch.delenv(prov.COMMIT_VARIABLE)
    monkeypatch.setattr(prov, "SOURCE_ROOT", tmp_path)  # a copy without .git and no commit named
    unknown = prov.source_revision()
    assert unknown["commit"] is None and unknown["from"].startswith("unknown")


def test_gpus_are_read_from_nvidia_smi(monkeypatch):
    monkeypatch.setattr(prov.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(prov, "_run", lambda command, cwd=None:
                        "NVIDIA H200, 580.159.04, 9.0, 143771\nNVIDIA H200, 580.159.04, 9.0, 143771")
    device = prov.device()
    assert device["gpu"] == "NVIDIA H200" and device["driver"] == "580.159.04"
    assert device["gpus"][1] == {"name": "NVIDIA H200", "driver": "580.159.04", "compute_capability": "9.0",
                                 "memory_mib": 143771}


def test_a_script_writes_its_result_atomically_with_provenance(tmp_path):
    target = tmp_path / "script.json"
    prov.write_result(target, {"top1": 0.99}, ["python3", "scripts/x.py", "--seq", "64"], {"seq": 64})
    data = json.loads(target.read_text())
    _check_block(data["provenance"], ["python3", "scripts/x.py", "--seq", "64"])
    assert data["top1"] == 0.99 and list(tmp_path.iterdir()) == [target]


def test_an_api_key_never_reaches_a_result_file():
    from runtime.provenance import provenance

    block = provenance(["loadtest", "--api-key", "s3cr3t", "--url", "http://x", "--api-key=k2"],
                       {"api_key": "s3cr3t", "url": "http://x", "other": None})
    assert "s3cr3t" not in json.dumps(block) and "k2" not in json.dumps(block)
    assert block["argv"] == ["loadtest", "--api-key", "<redacted>", "--url", "http://x", "--api-key=<redacted>"]
    assert block["settings"]["api_key"] == "<redacted>" and block["settings"]["url"] == "http://x"


def test_a_long_argument_and_a_long_list_are_recorded_by_size_and_digest():
    """A 1024-id prompt would be copied three times (command, argv, settings): each copy is its
    start, length and digest instead; short values stay as they are."""
    import hashlib

    from runtime.provenance import provenance

    ids = list(range(1024))
    text = ",".join(map(str, ids))
    block = provenance(["generate", "--prompt-ids", text, "--max-new-tokens", "64"], {"prompt_ids": ids, "seed": 3})
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    assert block["argv"][2] == f"{text[:64]}... ({len(text)} characters, sha256 {digest})"
    assert block["argv"][3:] == ["--max-new-tokens", "64"] and block["settings"]["seed"] == 3
    assert block["settings"]["prompt_ids"].startswith("1024 items, sha256 ")
    assert len(json.dumps(block)) < 4000
