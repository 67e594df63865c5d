"""Open anything the toolkit can decode with (PyTorch weights, an ONNX graph, a TensorRT engine,
a static-cache graph) as Decoders, whichever implementation it needs."""
from __future__ import annotations

from pathlib import Path

from models.graph_metadata import STATIC_KINDS, GraphMetadata, GraphMetadataError, read_graph_metadata

from ..backends import Backend
from ..registry import ENGINE_SUFFIXES, BackendSpec, check_runnable, is_weights, resolve_backend, static_cache_twin
from .base import Decoder, DecodingError
from .cache_feed import CacheFeedDecoder
from .static_cache import StaticCacheDecoder


class Decoders:
    """What is opened once (a backend session, or a static-cache graph) and gives decoders of any
    number of rows. Closing it closes the backend."""

    def __init__(self, spec: BackendSpec, target, options: dict):
        self.spec, self.options = spec, options
        self.backend: Backend | None = None
        if spec.static_cache and is_weights(target):
            raise DecodingError(f"{spec.name} runs a static-cache graph, not weights: write one first (export-model "
                                "--static-cache N, or runtime.commands.targets.decoder_target)")
        self.target = target
        if not spec.decoder:
            self.backend = spec.open(target, **options)
        self.name = self.backend.name if self.backend is not None else spec.name

    def decoder(self, rows: int = 1, owner=None) -> Decoder:
        if self.backend is None:
            decoder = self.spec.open(self.target, rows=rows, **self.options)
        elif self.backend.graph is not None and self.backend.graph.kind in STATIC_KINDS:
            decoder = StaticCacheDecoder(self.backend, rows)  # e.g. a TensorRT engine of the portable static graph
        else:
            decoder = CacheFeedDecoder(self.backend, rows)
        decoder.owner = owner
        return decoder

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def decoder_spec(target, backend: str = "auto") -> BackendSpec:
    """The backend that decodes `target`: as named (or `auto`), and for a static-cache graph file the
    static-cache backend on the same device."""
    path = target if isinstance(target, (str, Path)) else None
    spec = resolve_backend(backend, path)
    if path is not None and Path(path).suffix == ".onnx":
        kind = read_graph_metadata(path).kind
        if kind in STATIC_KINDS:
            spec = static_cache_twin(spec, kind)
    return spec


def open_decoders(target, backend: str = "auto", **options) -> Decoders:
    """`target`: a models.source.ModelSource (PyTorch weights), or a path to an .onnx graph or an
    engine; `options` go to the backend (precision, device, max_cache for weights written into a
    static-cache graph)."""
    spec = decoder_spec(target, backend)
    check_runnable(spec)
    return Decoders(spec, target, options)


def open_decoder(target, backend: str = "auto", rows: int = 1, **options) -> Decoder:
    """One decoder of `rows` rows; closing it closes what was opened for it."""
    decoders = open_decoders(target, backend, **options)
    try:
        return decoders.decoder(rows, owner=decoders)
    except BaseException:
        decoders.close()
        raise


def read_model_metadata(path: str | Path) -> GraphMetadata:
    """What a model file records about itself: an ONNX graph's metadata, or the graph metadata an
    engine's sidecar carries. Read before anything runs it."""
    if Path(path).suffix in ENGINE_SUFFIXES:
        from ..tensorrt.engine_files import read_sidecar

        if not Path(path).is_file():
            raise GraphMetadataError(f"engine not found: {path}")
        return GraphMetadata.from_props(read_sidecar(path).graph_metadata, f"the graph behind {path}")
    return read_graph_metadata(path)
