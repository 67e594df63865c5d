"""The command-level step between a model and a decoder: the static-cache backends run a graph,
and when a command is given weights for one, it writes that graph here (the runtime opens graphs;
it never runs the exporter)."""
from __future__ import annotations

from models.errors import ToolkitError


def decoder_target(target, backend: str, max_cache: int | None = None, precision: str | None = None):
    """What `runtime.decoding.open.open_decoders(…, backend)` opens: `target` itself, or, for a
    *-static backend given weights (a ModelSource), the static-cache graph of its kind written from
    them in memory, `max_cache` tokens deep, in `precision` (default fp32)."""
    from models.source import is_weights
    from runtime.decoding.open import decoder_spec

    spec = decoder_spec(target, backend)
    if not (spec.static_cache and is_weights(target)):
        return target
    return static_graph_bytes(target, spec.static_cache, max_cache, precision)


def static_graph_bytes(source, kind: str, max_cache: int | None, precision: str | None) -> bytes:
    """A ModelSource's weights written into a static-cache graph of `kind`, serialized in memory."""
    from export.static_cache_graph import MAX_WEIGHT_BYTES
    from models.graph_metadata import STATIC_PORTABLE
    from models.precision import precision as lookup_precision

    row = lookup_precision(precision or "fp32")
    if max_cache is None:
        raise ToolkitError("writing a static-cache graph from weights needs a cache size (max_cache)")
    size = source.weights.nbytes(row.float_row.torch_dtype)
    if size > MAX_WEIGHT_BYTES:
        raise ToolkitError(f"this model has {size / 1e9:.1f} GB of weights in {row.float_row.name}, more than a graph "
                           f"written in memory holds (2 GB); write it with export-model --static-cache {max_cache}"
                           f"{' --portable' if kind == STATIC_PORTABLE else ''} and pass the file")
    if kind == STATIC_PORTABLE:
        from export.onnx_export import build_portable_static_graph as build
    else:
        from export.static_cache_graph import build_static_cache_graph as build
    return build(source.model, max_cache, row.name, source.record).SerializeToString()
