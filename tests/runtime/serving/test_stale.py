"""A killed server's work folders are removed by the next one; a live server's never are."""
from __future__ import annotations

import os
import subprocess
import sys

from runtime.serving.stale import alive, remove_killed_servers_folders, remove_stale


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_folders_of_processes_that_are_gone_are_removed(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    assert not alive(dead) and alive(live) and alive(1)
    for name in (f"rotary-serve-{dead}-abc", f"rotary-serve-{live}-abc", "rotary-serve-oldstyle", "unrelated-1-x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"weights")
    (tmp_path / f"rotary-serve-{dead}-file").write_text("not a folder")
    removed = remove_stale(tmp_path, r"rotary-serve-(?P<pid>\d+)-.+")
    assert removed == [tmp_path / f"rotary-serve-{dead}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"rotary-serve-{live}-abc", "rotary-serve-oldstyle", "unrelated-1-x", f"rotary-serve-{dead}-file"])


def test_a_missing_folder_removes_nothing(tmp_path):
    assert remove_stale(tmp_path / "missing", r"(?P<pid>\d+)") == []


def test_only_this_namespaces_folders_of_both_kinds_are_judged(tmp_path):
    """A container sharing /tmp has process ids that look gone from here: its folders stay."""
    from runtime.serving.stale import namespace, rendezvous_name, serve_folder_prefix

    dead, space = _dead_pid(), namespace()
    ours = [f"rotary-serve-{space}-{dead}-a1b2c3d4", rendezvous_name(dead, "0123456789abcdef")]
    kept = [f"rotary-serve-{space}1-{dead}-a1b2c3d4", f"{serve_folder_prefix()}a1b2c3d4",
            f"rotary-serve-{space}-{dead}-2024notes", f"rotary-serve-{space}-99999999999-a1b2c3d4"]
    for name in ours + kept:
        (tmp_path / name).mkdir()
    assert sorted(p.name for p in remove_killed_servers_folders(tmp_path)) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
