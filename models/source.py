"""Where a model comes from: a checkpoint file, or a preset built from a seed (the embedded default)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import torch
from torch import Tensor

from .checkpoints import open_checkpoint
from .config import ConfigError, ModelConfig
from .errors import ToolkitError
from .graph_metadata import GraphMetadata, WeightsRecord
from .presets import DEFAULT_PRESET, DEFAULT_SEED, preset
from .transformer import Transformer, build_model
from .weights import ModelWeights


class WeightsMismatch(ToolkitError):
    """The weights given are not those a graph was exported from, or cannot be found."""


@dataclass(frozen=True)
class ModelSource:
    """Weights to export or compare against: read lazily from a checkpoint, or a model in memory."""

    weights: ModelWeights
    description: str  # for humans: "preset tiny (seed 0)" or the checkpoint path
    digest: "str | Future[str]"  # sha256 of the checkpoint file (maybe still being computed), or of generated weights
    preset: str | None = None  # set when the weights were generated from a preset
    seed: int | None = None
    built: Transformer | None = field(default=None, repr=False, compare=False)

    @property
    def sha256(self) -> str:
        return self.digest if isinstance(self.digest, str) else self.digest.result()

    @classmethod
    def of_model(cls, model: Transformer, description: str, sha256: str, preset: str | None = None,
                 seed: int | None = None) -> "ModelSource":
        return cls(ModelWeights.of(model), description, sha256, preset, seed, model)

    @cached_property
    def model(self) -> Transformer:
        """The model in memory, float32 (built from the checkpoint on first use)."""
        return self.built if self.built is not None else self.weights.build()

    @property
    def config(self) -> ModelConfig:
        return self.weights.config

    @property
    def pending_record(self) -> "PendingRecord":
        """The record, for an export to resolve only when it writes the graph's metadata (so a
        checkpoint's hash overlaps the tracing)."""
        return PendingRecord(self)

    @property
    def record(self) -> WeightsRecord:
        """What an exported graph records about its weights, enough to rebuild a preset."""
        return WeightsRecord(self.description, self.sha256, self.preset, self.seed)


@dataclass(frozen=True)
class PendingRecord:
    """A ModelSource's WeightsRecord whose sha256 may still be being computed."""

    source: ModelSource

    @property
    def description(self) -> str:
        return self.source.description

    def resolve(self) -> WeightsRecord:
        return self.source.record


@dataclass(frozen=True)
class ModelRequest:
    """The model flags every command shares: a checkpoint (config fields override it), or a
    preset built from a seed."""

    checkpoint: str | None = None
    config: dict[str, Any] | None = None
    preset: str | None = None
    seed: int = DEFAULT_SEED

    @property
    def given(self) -> bool:
        return bool(self.checkpoint or self.preset or self.config)

    def resolve(self) -> "ModelSource":
        if self.checkpoint and self.preset:
            raise ConfigError("give either --checkpoint or --preset, not both")
        return resolve_model(self.checkpoint, self.config, self.preset, self.seed)


def is_weights(target) -> bool:
    """Whether `target` is PyTorch weights (a ModelSource) rather than a graph or an engine."""
    return isinstance(target, ModelSource)


def weights_sha256(model: "Transformer | Mapping[str, Tensor]") -> str:
    """sha256 over every tensor's name, dtype, shape and bytes in name order, read one at a time
    (for weights with no file of their own)."""
    tensors = model.state_dict() if isinstance(model, Transformer) else model
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{str(tensor.dtype).removeprefix('torch.')}:{tuple(tensor.shape)}:".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b"")
    return digest.hexdigest()


def parse_config_argument(text: str | None) -> dict[str, Any] | None:
    """`--config` takes inline JSON or a path to a JSON file."""
    if text is None:
        return None
    candidate = Path(text)
    if not text.lstrip().startswith(("{", "[", '"')) and not candidate.is_file():
        if candidate.exists():
            raise ConfigError(f"--config {text!r} is a directory; give inline JSON or a JSON file")
        raise ConfigError(f"--config {text!r} is neither inline JSON nor an existing JSON file")
    if candidate.is_file() and not text.lstrip().startswith(("{", "[")):
        try:
            text = candidate.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"--config file {text} is not text; give a JSON file of model config fields (the "
                              "config.json written next to a checkpoint, say) or inline JSON") from None
        except OSError as error:
            raise ConfigError(f"cannot read --config file {text}: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--config is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config must be a JSON object of model config fields")
    return data


def check_buildable(config: ModelConfig, name: str, memory_bytes: int | None = None) -> None:
    """Refuse, before allocating anything, a model whose fp32 weights would take more than half of
    this machine's memory (`memory_bytes`: that memory, by default read from the system)."""
    from .presets import parameter_count

    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
    needed = 4 * parameter_count(config)
    if needed > memory_bytes // 2:
        raise ConfigError(f"preset {name} has {parameter_count(config) / 1e9:.1f}B parameters ({needed / 2**30:.0f} GiB "
                          f"in fp32), more than half of this machine's {memory_bytes / 2**30:.0f} GiB: write it as "
                          f"shards first (python scripts/write_preset.py {name} FOLDER) and pass --checkpoint FOLDER")


def resolve_model(
    checkpoint: str | None = None, config: dict[str, Any] | None = None, preset_name: str | None = None,
    seed: int = DEFAULT_SEED,
) -> ModelSource:
    """Load `checkpoint` (config fields override), or build `preset_name`/`config` from `seed`."""
    if checkpoint is not None:
        opened = open_checkpoint(checkpoint, config)
        return ModelSource(opened.weights, f"{checkpoint} ({opened.layout} layout)", opened.digest)
    preset_name = preset_name or DEFAULT_PRESET
    base = preset(preset_name)
    model_config = ModelConfig.from_dict({**base.to_dict(), **config}) if config else base
    check_buildable(model_config, preset_name)
    model = build_model(model_config, seed)
    label = f"preset {preset_name}" + (" with config overrides" if config else "")
    return ModelSource.of_model(model, f"{label} (seed {seed})", weights_sha256(model),
                       None if config else preset_name, None if config else seed)


def reference_source(metadata: GraphMetadata, where: str, request: ModelRequest | None = None) -> ModelSource:
    """The weights `where` was exported from: those requested, or the preset it records, rebuilt.
    Their sha256 must equal the one the graph records."""
    if request is not None and request.given:
        source = request.resolve()
    elif metadata.weights.preset is not None:
        source = resolve_model(None, None, metadata.weights.preset, metadata.weights.seed or 0)
    else:
        raise WeightsMismatch(f"{where} does not record a preset to rebuild its weights from; pass the weights it "
                              "was exported from with --checkpoint (or --preset/--config as at export)")
    recorded = metadata.weights.sha256
    if recorded and recorded != source.sha256:
        raise WeightsMismatch(
            f"the reference weights ({source.description}) are not the files {where} was exported from "
            f"(sha256 {recorded[:12]}...); pass the checkpoint used for the export, as it was stored (the sha256 is "
            f"of its files: the same weights in other shards or in one file differ)"
        )
    return source
