"""Work folders that a killed server left behind in the temporary directory.

`serve` copies the model into a work folder, and each decode process keeps a rendezvous folder;
both are removed on a normal exit, but a server killed outright (SIGKILL, the OOM killer) cannot,
and a model's copy is as large as the model. Their names carry the owning process's id, so the
next server removes those whose process is gone. (Servers in other process namespaces that share
one temporary directory, containers with /tmp mounted, would look gone to each other: give each
its own TMPDIR.)
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

SERVE_PREFIX = "rotary-serve-"  # serve's work folder: the prefix, its process id, a random part
DECODE_PREFIX = "rotary-decode-"  # a decode process's rendezvous: the prefix, user id, server process id, a digest


def serve_folder_prefix() -> str:
    """The prefix of this process's work folder (tempfile adds a random part)."""
    return f"{SERVE_PREFIX}{os.getpid()}-"


def rendezvous_name(server_pid: int, digest: str) -> str:
    return f"{DECODE_PREFIX}{os.getuid()}-{server_pid}-{digest}"


def remove_killed_servers_folders(folder: Path | None = None) -> list[Path]:
    """Both kinds of folder in `folder` (default: the temporary directory) left by servers that are gone."""
    folder = Path(tempfile.gettempdir()) if folder is None else folder
    return (remove_stale(folder, rf"{SERVE_PREFIX}(?P<pid>\d+)-.+")
            + remove_stale(folder, rf"{DECODE_PREFIX}{os.getuid()}-(?P<pid>\d+)-[0-9a-f]{{16}}"))


def alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path, pattern: str) -> list[Path]:
    """Remove this user's folders in `folder` whose names match `pattern` (a regular expression whose
    group "pid" is the owning process) and whose process is gone; returns them."""
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = re.fullmatch(pattern, entry.name)
        try:
            mine = entry.is_dir() and not entry.is_symlink() and entry.stat().st_uid == os.getuid()
        except OSError:
            continue
        if match and mine and not alive(int(match.group("pid"))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
