"""The Backend contract: named arrays in, named arrays out, with input/output metadata.

One inference path, `run(feeds)`, takes numpy arrays or torch tensors and answers in the same
kind. Every backend (PyTorch, ONNX Runtime, TensorRT) implements the side it runs natively,
`_run_numpy` (host arrays) or `_run_torch` (tensors on its device), and the base class checks
the feeds against the metadata once, for both kinds, and converts only at that edge, keeping
every dtype (an fp16 cache stays fp16 on its way out).
"""
from __future__ import annotations

import abc
import math
import sys
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from models.config import ModelConfig
from models.errors import ToolkitError
from models.graph_metadata import GraphMetadata
from models.signature import SUM_AXES, GraphSignature


class BackendError(ToolkitError):
    """A backend cannot load a model or cannot run the given inputs."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str | None, ...]  # int: fixed; str: symbolic axis; None: unknown


def _dtype_name(dtype) -> str:
    """'int64' for np.int64 and torch.int64 alike."""
    return str(dtype).removeprefix("torch.") if not isinstance(dtype, np.dtype) else dtype.name


class Backend(abc.ABC):
    """Runs one model. Use as a context manager, or call close()."""

    name: str = "backend"
    vocab_size: int | None = None  # when known, token ids are range-checked before running
    config: ModelConfig | None = None  # the model the backend runs
    graph: GraphMetadata | None = None  # what the exported graph (or engine) records about itself

    @property
    @abc.abstractmethod
    def inputs(self) -> list[TensorMeta]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> list[TensorMeta]: ...

    device = "cpu"  # where torch feeds are run and torch outputs are left

    def run(self, feeds: Mapping) -> dict:
        """Check `feeds` against the input metadata, run, and return every output by name: numpy
        arrays for numpy feeds (on the host), torch tensors for torch feeds (on the backend's device)."""
        if getattr(self, "_closed", False):
            raise BackendError(f"{self.name}: the backend is closed; open a new one")
        kinds = {_is_torch(value) for value in feeds.values()}
        if len(kinds) > 1:
            raise BackendError(f"{self.name}: feeds mix numpy arrays and torch tensors; pass one kind")
        if kinds == {True}:
            self.check_feeds(feeds)
            return self._run_torch(dict(feeds))
        feeds = {name: np.asarray(value) for name, value in feeds.items()}
        self.check_feeds(feeds)
        return self._run_numpy(feeds)

    def _run_numpy(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in and out; by default through `_run_torch` on the backend's device."""
        from .arrays import to_numpy, to_torch

        if type(self)._run_torch is Backend._run_torch:
            raise NotImplementedError(f"{type(self).__name__} implements neither _run_numpy nor _run_torch")
        outputs = self._run_torch({name: to_torch(value).to(self.device) for name, value in feeds.items()})
        return {name: to_numpy(value) for name, value in outputs.items()}

    def _run_torch(self, feeds: dict) -> dict:
        """Tensors in and out; by default through `_run_numpy` on the host."""
        from .arrays import to_numpy, to_torch

        if type(self)._run_numpy is Backend._run_numpy:
            raise NotImplementedError(f"{type(self).__name__} implements neither _run_numpy nor _run_torch")
        outputs = self._run_numpy({name: to_numpy(value) for name, value in feeds.items()})
        return {name: to_torch(value) for name, value in outputs.items()}

    def check_feeds(self, feeds: Mapping) -> None:
        """Names, dtypes, ranks, fixed and shared dimensions, and token id range; numpy or torch values."""
        expected = {meta.name: meta for meta in self.inputs}
        missing, unexpected = sorted(set(expected) - set(feeds)), sorted(set(feeds) - set(expected))
        if missing or unexpected:
            raise BackendError(
                f"{self.name}: inputs must be {sorted(expected)}; missing {missing}, unexpected {unexpected}"
            )
        symbols: dict[str, int] = {}
        for name, meta in expected.items():
            value = feeds[name]
            dtype = _dtype_name(value.dtype)
            if dtype != meta.dtype:
                raise BackendError(f"{self.name}: input {name!r} must be {meta.dtype}, got {dtype}")
            if value.ndim != len(meta.shape):
                raise BackendError(
                    f"{self.name}: input {name!r} must have {len(meta.shape)} dimensions {meta.shape}, got shape {value.shape}"
                )
            for axis, (size, want) in enumerate(zip(value.shape, meta.shape)):
                if isinstance(want, int) and size != want:
                    raise BackendError(f"{self.name}: input {name!r} dimension {axis} must be {want}, got {size}")
                if isinstance(want, str) and symbols.setdefault(want, size) != size:
                    raise BackendError(
                        f"{self.name}: input {name!r} dimension {axis} ({want}) is {size} but another input has {want}={symbols[want]}"
                    )
        for derived, parts in SUM_AXES.items():
            if derived in symbols and all(part in symbols for part in parts):
                expected_size = sum(symbols[part] for part in parts)
                if symbols[derived] != expected_size:
                    raise BackendError(
                        f"{self.name}: {derived} is {symbols[derived]} but {' + '.join(parts)} is {expected_size}; "
                        "the attention mask must cover the cached and the new tokens"
                    )
        ids = feeds.get("input_ids")
        if self.vocab_size is not None and ids is not None and math.prod(ids.shape):
            low, high = _id_range(ids)
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise BackendError(
                    f"{self.name}: token id {bad} is out of range; the model's vocabulary is 0..{self.vocab_size - 1}"
                )

    @property
    def input_names(self) -> list[str]:
        return [meta.name for meta in self.inputs]

    def adopt_graph(self, graph: GraphMetadata, where: str) -> None:
        """Take the graph's model config and vocabulary, after checking that the inputs and outputs
        are those its signature declares: a renamed or foreign graph is refused before it runs."""
        check_io(graph.signature(), self.inputs, self.outputs, where)
        self.graph, self.config, self.vocab_size = graph, graph.config, graph.config.num_tokens

    def close(self) -> None:
        """Release the backend's resources; it cannot run afterwards."""
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _is_torch(value) -> bool:
    torch = sys.modules.get("torch")  # not imported: no value can be a tensor, and numpy-only use stays light
    return torch is not None and isinstance(value, torch.Tensor)


def _id_range(ids) -> tuple[int, int]:
    """(min, max) of the ids; one device-to-host copy for a tensor on a GPU."""
    if _is_torch(ids):
        import torch

        low, high = torch.aminmax(ids)
        return tuple(torch.stack((low, high)).tolist())
    return int(ids.min()), int(ids.max())


def check_io(signature: GraphSignature, inputs: list[TensorMeta], outputs: list[TensorMeta], where: str) -> None:
    """Names and dtypes of a loaded graph against what export declared for its kind."""
    for kind, specs, metas in (("inputs", signature.inputs, inputs), ("outputs", signature.outputs, outputs)):
        want = {spec.name: spec.dtype for spec in specs}
        have = {meta.name: meta.dtype for meta in metas}
        if set(want) != set(have):
            missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
            raise BackendError(f"{where} does not have the {kind} its metadata declares (missing {missing[:3]}, "
                               f"unexpected {extra[:3]}); export it again with export-model")
        wrong = [name for name in want if want[name] != have[name]]
        if wrong:
            raise BackendError(f"{where}: {kind[:-1]} {wrong[0]!r} is {have[wrong[0]]}, but the metadata declares "
                               f"{want[wrong[0]]}; export it again with export-model")
