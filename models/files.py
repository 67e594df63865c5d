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
import shutil
import tempfile
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
    fd, temporary = tempfile.mkstemp(prefix=staging_prefix(path), suffix=".partial", dir=path.parent)
    os.close(fd)
    temporary = Path(temporary)
    os.chmod(temporary, new_file_mode())  # mkstemp creates 0600; the result should look like any new file
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden folder beside `path` for files that are moved into place together; removed after."""
    path = Path(path)
    remove_abandoned(path)
    with tempfile.TemporaryDirectory(prefix=staging_prefix(path), dir=path.parent) as folder:
        yield Path(folder)


def probe_writable(path: str | os.PathLike) -> None:
    """Raise OSError now if a staging file cannot be created beside `path` (read-only file system,
    immutable or foreign folder), instead of after the work."""
    path = Path(path)
    fd, probe = tempfile.mkstemp(prefix=staging_prefix(path), suffix=".probe", dir=path.parent)
    os.close(fd)
    os.unlink(probe)
