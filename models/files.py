"""File helpers: content hashes and all-or-nothing writes.

Everything a command writes is staged beside its destination under a name that carries the
writer's process id (`.NAME.staging-PID-*`) and renamed into place only when complete. A run
that dies without cleaning up (SIGKILL, power loss) leaves such a name behind; the next write
to the same destination recognises it by its dead process id and removes it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

STAGING = "staging"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The permissions open() would give a new file under the current umask."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """The permissions mkdir() would give a new folder under the current umask."""
    return 0o777 & ~_umask()


def staging_prefix(path: Path) -> str:
    return f".{path.name}.{STAGING}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_abandoned(path: str | os.PathLike) -> list[Path]:
    """Remove staging files and folders left beside `path` by writers that no longer run."""
    path = Path(path)
    removed = []
    for entry in path.parent.glob(f".{path.name}.{STAGING}-*"):
        pid = entry.name[len(f".{path.name}.{STAGING}-"):].partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # not ours to remove after all (permissions): leave it
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A failure (or Ctrl-C, SIGTERM, SIGHUP) part-way leaves neither a partial file nor the
    temporary behind.
    """
    path = Path(path)
    remove_abandoned(path)
    # named before it exists and created inside the try (see staging_folder)
    temporary = path.parent / f"{staging_prefix(path)}{secrets.token_hex(6)}.partial"
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, new_file_mode()))  # as open() would make it
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden folder beside `path` for files that are moved into place together; removed after."""
    path = Path(path)
    remove_abandoned(path)
    # named before it exists and made inside the try: a signal that interrupts this (Ctrl-C raises
    # anywhere) leaves no folder behind, as TemporaryDirectory's made-then-entered could
    folder = path.parent / f"{staging_prefix(path)}{secrets.token_hex(6)}"
    try:
        folder.mkdir()
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def probe_writable(path: str | os.PathLike) -> None:
    """Raise OSError now if a staging file cannot be created beside `path` (read-only file system,
    immutable or foreign folder), instead of after the work."""
    path = Path(path)
    probe = path.parent / f"{staging_prefix(path)}{secrets.token_hex(6)}.probe"  # made in the try: see staging_folder
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    finally:
        probe.unlink(missing_ok=True)
