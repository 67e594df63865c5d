"""Checkpoints: the project's safetensors format, and upstream native-sparse-attention-pytorch
state_dicts. Loading never unpickles arbitrary objects (safetensors or weights_only=True)."""
from __future__ import annotations

import os
import pickle
import threading
from concurrent.futures import Future
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError, ModelConfig
from .errors import ToolkitError
from .files import atomic_path, sha256_file
from .rotary import inverse_frequencies
from .shards import INDEX_NAME, ShardedState, ShardError, is_sharded, write_shards
from .transformer import Transformer
from .weights import LazyTensors, ModelWeights, dtype_of, shape_of

FORMAT_NAME = "rotary-transformer"
PROJECT_LAYOUT, UPSTREAM_LAYOUT = "project", "upstream"
PROJECT_MARKER = "layers.0.attn.norm.weight"
UPSTREAM_MARKER = "layers.0.0.to_q.weight"


class CheckpointError(ToolkitError, ValueError):
    """A checkpoint that is missing, unreadable, of an unknown layout or of the wrong shapes."""


@dataclass(frozen=True)
class OpenedCheckpoint:
    weights: ModelWeights  # read lazily
    layout: str
    digest: "Future[str]"  # the file's (or shards') sha256, computed in the background

    @property
    def sha256(self) -> str:
        return self.digest.result()


def hash_in_background(compute: Callable[[], str]) -> "Future[str]":
    """Start `compute` (a sha256 of files) on a daemon thread: hashing a 13 GB checkpoint reads it
    once more, which then overlaps the export's tracing instead of preceding it. A daemon thread,
    so a command that fails early does not wait for the hash at exit."""
    future: Future[str] = Future()

    def run() -> None:
        try:
            future.set_result(compute())
        except BaseException as error:  # handed to whoever asks for the digest
            future.set_exception(error)

    threading.Thread(target=run, name="checkpoint-sha256", daemon=True).start()
    return future


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: Transformer
    layout: str
    sha256: str


def save_checkpoint(model: Transformer, path: str | os.PathLike) -> Path:
    """Write weights and config to one .safetensors file (config in its metadata), atomically."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    metadata = {"format": FORMAT_NAME, "config": model.config.to_json()}
    with atomic_path(path) as temporary:  # our temporary (umask permissions), not safetensors' own
        temporary.write_bytes(save(tensors, metadata=metadata))
    return path


def save_checkpoint_shards(model: Transformer, folder: str | os.PathLike, max_shard_bytes: int = 2 << 30) -> Path:
    """Write weights and config as a folder of safetensors shards with their index (the layout large
    checkpoints ship in), one shard in memory at a time."""
    metadata = {"format": FORMAT_NAME, "config": model.config.to_json()}
    return write_shards(((name, t) for name, t in model.state_dict().items()), folder, metadata, max_shard_bytes)


def shard_checkpoint(source: str | os.PathLike, folder: str | os.PathLike, max_shard_bytes: int = 2 << 30) -> Path:
    """A project .safetensors checkpoint rewritten as shards, read tensor by tensor (never the whole
    model in memory)."""
    from .safetensors_file import SafetensorsError, SafetensorsFile

    source = Path(source)
    try:
        handle = SafetensorsFile(source)
        metadata = handle.metadata()
    except (SafetensorsError, OSError) as error:
        raise CheckpointError(f"cannot read checkpoint {source}: not a readable .safetensors file ({error})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{source} is not a checkpoint of this project's format (no {FORMAT_NAME} metadata); "
                              "load it with load_checkpoint and write it with save_checkpoint_shards")
    return write_shards(((name, handle.read(name)) for name in handle.keys()), folder, metadata, max_shard_bytes)


def _safetensors_tensors(files: Mapping[str, Any]) -> LazyTensors:
    """Tensors by name from SafetensorsFiles (name -> the file that holds it), read on access."""
    return LazyTensors({name: (lambda f=file, n=name: f.read(n)) for name, file in files.items()},
                       {name: file.shape(name) for name, file in files.items()},
                       {name: file.dtype(name) for name, file in files.items()})


def _read_state(path: Path) -> tuple[Mapping[str, Tensor], dict[str, str]]:
    """Tensors and string metadata from a safetensors file or a folder of safetensors shards with
    their index (both read a tensor at a time, on access), or a torch.save'd state_dict (read whole)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_sharded(path):
        try:
            state = ShardedState(path)
        except ShardError as error:
            raise CheckpointError(str(error)) from None
        metadata = {k: v for k, v in state.metadata.items() if isinstance(v, str)}
        return _safetensors_tensors({name: state.file(name) for name in state}), metadata
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder without {INDEX_NAME}; pass a .safetensors or .pt "
                              "file, or a folder of safetensors shards with their index")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        from .safetensors_file import SafetensorsError, SafetensorsFile

        try:
            opened = SafetensorsFile(path)
        except (SafetensorsError, OSError) as error:
            raise CheckpointError(f"cannot read checkpoint {path}: corrupt safetensors file ({error})") from None
        return _safetensors_tensors({name: opened for name in opened.keys()}), opened.metadata()
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        hint = (f"; for a sharded checkpoint pass its folder, {path.parent}" if path.name == INDEX_NAME else "")
        raise CheckpointError(f"cannot read checkpoint {path}: not a safetensors file or a torch.save'd state_dict"
                              f"{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"it pickles {found.group(1)}" if found else "it pickles objects other than tensors"
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a plain state_dict that loads with weights_only=True "
            f"({what}); re-save it with torch.save(model.state_dict())"
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise CheckpointError(
            f"cannot read checkpoint {path}: not a safetensors file or a PyTorch state_dict ({type(error).__name__})"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"cannot read checkpoint {path}: expected a dict of tensors (a state_dict)")
    return state, {}


def detect_layout(keys) -> str:
    keys = set(keys)
    if PROJECT_MARKER in keys and "token_emb.weight" in keys:
        return PROJECT_LAYOUT
    if UPSTREAM_MARKER in keys and "token_emb.weight" in keys:
        return UPSTREAM_LAYOUT
    sample = sorted(keys)[:6]
    raise CheckpointError(
        "unrecognised checkpoint layout: expected this project's keys ('token_emb.weight', "
        f"'{PROJECT_MARKER}', ...) or native-sparse-attention-pytorch's ('token_emb.weight', "
        f"'{UPSTREAM_MARKER}', ...); found {sample}{' ...' if len(keys) > 6 else ''}"
    )


def _depth(state: Mapping[str, Tensor]) -> int:
    indices = {int(m.group(1)) for key in state if (m := re.match(r"layers\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def theta_from_frequencies(freqs: Tensor, dim_head: int) -> float:
    """Recover rotary theta from stored frequencies theta^(-2i/dim_head); refuse custom ones."""
    if dim_head < 4:
        return 10000.0
    theta = float(freqs[1].double() ** (-dim_head / 2))
    theta = float(f"{theta:.6g}")
    if not torch.allclose(inverse_frequencies(dim_head, theta), freqs.float(), rtol=1e-5, atol=0):
        raise CheckpointError("the checkpoint's rotary frequencies are not theta^(-2i/dim_head); custom frequencies are not supported")
    return theta


def infer_upstream_config(state: Mapping[str, Tensor]) -> ModelConfig:
    """The whole upstream config, from tensor shapes alone (and the small rotary frequencies)."""
    num_tokens, dim = shape_of(state, "token_emb.weight")
    freqs = state["layers.0.0.rotary_embed.freqs"]
    dim_head = 2 * freqs.shape[0]
    heads = shape_of(state, "layers.0.0.to_q.weight")[0] // dim_head
    kv_heads = shape_of(state, "layers.0.0.to_k.weight")[0] // dim_head
    hidden = shape_of(state, "layers.0.1.1.weight")[0]
    return ModelConfig(
        num_tokens=num_tokens, dim=dim, depth=_depth(state), dim_head=dim_head, heads=heads,
        kv_heads=kv_heads, ff_expansion_factor=hidden / dim, causal=True, norm="rms",
        norm_eps=torch.finfo(torch.float32).eps,  # torch.nn.RMSNorm(eps=None) in float32
        qkv="separate", rotary_pairing="interleaved", theta=theta_from_frequencies(freqs, dim_head),
        ff_bias="layers.0.1.1.bias" in state,
    )


def upstream_to_project(state: Mapping[str, Tensor], config: ModelConfig) -> LazyTensors:
    """Upstream tensors under this project's names, read on access; q/k/v fused when the config asks."""
    renamed = {"token_emb.weight": "token_emb.weight", "norm.weight": "norm.weight",
               "to_logits.weight": "to_logits.weight"}
    fused: dict[str, list[str]] = {}
    for i in range(config.depth):
        up, own = f"layers.{i}.", f"layers.{i}."
        renamed[own + "attn.norm.weight"] = up + "0.norm.weight"
        parts = [up + f"0.to_{name}.weight" for name in "qkv"]
        if config.qkv == "fused":
            fused[own + "attn.to_qkv.weight"] = parts
        else:
            renamed.update({own + f"attn.to_{name}.weight": part for name, part in zip("qkv", parts)})
        renamed[own + "attn.to_out.weight"] = up + "0.to_out.weight"
        renamed[own + "ff.norm.weight"] = up + "1.0.weight"
        for src, dst in (("1.1", "ff.proj_in"), ("1.3", "ff.proj_out")):
            for kind in ("weight", "bias"):
                if up + f"{src}.{kind}" in state:
                    renamed[own + f"{dst}.{kind}"] = up + f"{src}.{kind}"
    for name in [*renamed.values(), *(part for parts in fused.values() for part in parts)]:
        if name not in state:
            raise KeyError(name)
    readers = {own: (lambda key=key: state[key]) for own, key in renamed.items()}
    shapes = {own: shape_of(state, key) for own, key in renamed.items()}
    dtypes = {own: dtype_of(state, key) for own, key in renamed.items()}
    for own, parts in fused.items():
        readers[own] = lambda parts=parts: torch.cat([state[part] for part in parts], dim=0)
        shapes[own] = (sum(shape_of(state, part)[0] for part in parts), *shape_of(state, parts[0])[1:])
        dtypes[own] = dtype_of(state, parts[0])
    return LazyTensors(readers, shapes, dtypes)


def _merge_config(base: ModelConfig | None, override: dict[str, Any] | None) -> ModelConfig:
    if base is None:
        if not override:
            raise CheckpointError("this checkpoint carries no config; pass one with --config")
        return ModelConfig.from_dict(override)
    return ModelConfig.from_dict({**base.to_dict(), **(override or {})}) if override else base


def open_checkpoint(path: str | os.PathLike, config_override: dict[str, Any] | None = None) -> OpenedCheckpoint:
    """Open a project or upstream checkpoint without reading its weights: the config, and every
    tensor under this project's name, checked for name, shape and dtype from the file's headers.

    The layout is detected from the keys; the config comes from the file's metadata
    (project format) or is inferred from the tensor shapes (upstream); `config_override`
    replaces individual fields.
    """
    path = Path(path)
    state, metadata = _read_state(path)
    layout = detect_layout(state)
    try:
        if layout == UPSTREAM_LAYOUT:
            config = _merge_config(infer_upstream_config(state), config_override)
            tensors = upstream_to_project(state, config)
        else:
            stored = metadata.get("config")
            sidecar = path.with_name("config.json")
            if stored is None and sidecar.exists():
                stored = sidecar.read_text()
            config = _merge_config(ModelConfig.from_json(stored) if stored else None, config_override)
            tensors = state
    except KeyError as error:
        raise CheckpointError(f"checkpoint {path} lacks the tensor {error.args[0]!r} that its {layout} layout needs; "
                              "is it a complete state_dict of the model?") from None
    except ConfigError as error:
        raise CheckpointError(f"cannot build a model config from {path}: {error}") from None
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match its config: missing keys {missing[:4]}, unexpected keys {unexpected[:4]}"
        )
    for name in tensors:
        shape, dtype = shape_of(tensors, name), dtype_of(tensors, name)
        if shape != tuple(expected[name].shape):
            raise CheckpointError(
                f"checkpoint {path} does not match its config: {name} has shape {shape}, "
                f"expected {tuple(expected[name].shape)}"
            )
        if not dtype.is_floating_point:
            raise CheckpointError(f"checkpoint {path}: {name} holds {str(dtype).removeprefix('torch.')} values, "
                                  "not floating point; is it a weight of this model?")
    digest = hash_in_background(ShardedState(path).sha256 if is_sharded(path) else lambda: sha256_file(path))
    return OpenedCheckpoint(ModelWeights(config, tensors), layout, digest)


def load_checkpoint(path: str | os.PathLike, config_override: dict[str, Any] | None = None) -> LoadedCheckpoint:
    """Load a project or upstream checkpoint into an eval-mode float32 Transformer (see open_checkpoint)."""
    opened = open_checkpoint(path, config_override)
    return LoadedCheckpoint(model=opened.weights.build(), layout=opened.layout, sha256=opened.sha256)
