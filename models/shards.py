"""Sharded safetensors checkpoints, the layout large checkpoints ship in: a folder of
`model-0000K-of-0000N.safetensors` files and `model.safetensors.index.json`, whose `weight_map`
names the file of every tensor.

Reading is lazy: `ShardedState` reads each shard's header, and a tensor's bytes only when it is
asked for (models/safetensors_file.py says why not through a memory map). Writing streams:
tensors go to the current shard until it reaches `max_shard_bytes`, so at most one shard's
tensors are held at a time; the folder is written beside its destination and renamed when
complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from torch import Tensor

from .errors import ToolkitError
from .files import new_file_mode

INDEX_NAME = "model.safetensors.index.json"


class ShardError(ToolkitError, ValueError):
    """A sharded checkpoint whose index or shards are missing, unreadable or inconsistent."""


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / INDEX_NAME).is_file()


class ShardedState(Mapping):
    """The tensors of a sharded checkpoint by name, each read from its shard on access."""

    def __init__(self, folder: str | os.PathLike):
        from .safetensors_file import SafetensorsError, SafetensorsFile

        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / INDEX_NAME).read_text())
            weight_map, self.metadata = index["weight_map"], dict(index.get("metadata") or {})
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ShardError(f"cannot read {self.folder / INDEX_NAME}: not a safetensors index ({error})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ShardError(f"{self.folder / INDEX_NAME} has an empty or malformed weight_map")
        self._files: dict[str, SafetensorsFile] = {}
        for name in sorted(set(weight_map.values())):
            if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
                raise ShardError(f"{self.folder / INDEX_NAME} names the shard {name!r} outside its folder; "
                                 "shards must be plain file names in the checkpoint's folder")
            if not (self.folder / name).is_file():
                raise ShardError(f"shard {name} that {INDEX_NAME} names is missing from {self.folder}")
            try:
                self._files[name] = SafetensorsFile(self.folder / name)
            except (SafetensorsError, OSError) as error:
                raise ShardError(f"cannot read shard {self.folder / name}: corrupt safetensors file ({error})") from None
        for tensor, name in weight_map.items():
            if tensor not in self._files[name].keys():
                raise ShardError(f"shard {name} does not hold {tensor!r}, which {INDEX_NAME} says it does")
        self._where = dict(weight_map)

    def __getitem__(self, name: str) -> Tensor:
        return self._files[self._where[name]].read(name)

    def file(self, name: str):
        """The SafetensorsFile that holds `name`."""
        return self._files[self._where[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def sha256(self) -> str:
        """One digest of the index and every shard (each hashed as it is on disk)."""
        from .files import sha256_file

        digest = hashlib.sha256((self.folder / INDEX_NAME).read_bytes())
        for name in sorted(self._files):
            digest.update(f"{name}:{sha256_file(self.folder / name)}".encode())
        return digest.hexdigest()


def write_shards(tensors: Iterable[tuple[str, Tensor]], folder: str | os.PathLike, metadata: dict[str, str],
                 max_shard_bytes: int = 2 << 30) -> Path:
    """Write (name, tensor) pairs as a sharded checkpoint in `folder` (which must not exist), holding
    at most one shard's tensors; `metadata` goes into the index and every shard."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        raise ShardError(f"{folder} already exists; choose a new folder for the shards")
    if max_shard_bytes < 1:
        raise ShardError(f"the shard size must be at least 1 byte, got {max_shard_bytes}")
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shards: list[list[str]] = []
        current: dict[str, Tensor] = {}
        size = total = 0

        def flush() -> None:
            if current:
                part = staging / f"part-{len(shards):05d}"
                save_file(current, str(part), metadata=metadata)
                os.chmod(part, new_file_mode())  # safetensors creates its files 0600
                shards.append(list(current))
                current.clear()

        for name, tensor in tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
                size = 0
            current[name] = tensor.detach().contiguous()
            size, total = size + nbytes, total + nbytes
        flush()
        if not shards:
            raise ShardError("no tensors to write")
        weight_map = {}
        for number, names in enumerate(shards, 1):
            final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            (staging / f"part-{number - 1:05d}").rename(staging / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {**metadata, "total_size": total}, "weight_map": weight_map}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=1))
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
