"""Work folders that a killed server left behind in the temporary directory.

`serve` copies the model into a work folder, and each decode process keeps a rendezvous folder;
both are removed on a normal exit, but a server killed outright (SIGKILL, the OOM killer) cannot,
and a model's copy is as large as the model. Their names carry the owning process's id, so the
next server removes those whose process is gone. The names also carry the process-id namespace,
and only folders of this one are judged: a server in a container that shares /tmp with the host
has process ids that look gone from here.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

SERVE_PREFIX = "rotary-serve-"  # serve's work folder: prefix, namespace, its process id, tempfile's random part
DECODE_PREFIX = "rotary-decode-"  # a decode process's rendezvous: prefix, user id, namespace, server's id, a digest


def namespace() -> str:
    """This process's process-id namespace (the inode of /proc/self/ns/pid; "0" where there is none)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def serve_folder_prefix() -> str:
    """The prefix of this process's work folder (tempfile adds a random part)."""
    return f"{SERVE_PREFIX}{namespace()}-{os.getpid()}-"


def rendezvous_name(server_pid: int, digest: str) -> str:
    return f"{DECODE_PREFIX}{os.getuid()}-{namespace()}-{server_pid}-{digest}"


def remove_killed_servers_folders(folder: Path | None = None) -> list[Path]:
    """Both kinds of folder in `folder` (default: the temporary directory) left by servers of this
    namespace that are gone."""
    folder = Path(tempfile.gettempdir()) if folder is None else folder
    space = namespace()
    return (remove_stale(folder, rf"{SERVE_PREFIX}{space}-(?P<pid>\d{{1,10}})-[a-z0-9_]{{8}}")
            + remove_stale(folder, rf"{DECODE_PREFIX}{os.getuid()}-{space}-(?P<pid>\d{{1,10}})-[0-9a-f]{{16}}"))


def alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's; or no process id at all: not judged
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
