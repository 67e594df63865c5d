"""PyTorch -> ONNX with symbolic batch and sequence axes, metadata, lint and verification."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

from models.config import ModelConfig
from models.errors import ToolkitError
from models.files import new_file_mode, staging_folder
from models.graph_metadata import LOGITS, STATIC_PORTABLE, WITH_PAST, GraphMetadata, QuantizationRecord, WeightsRecord
from models.precision import Precision, precision as lookup_precision
from models.progress import phase
from models.signature import BATCH, LOGITS_POSITIONS, SEQUENCE, GraphSignature, graph_signature, static_cache_signature
from models.static_cache import StaticCacheGraph
from models.source import PendingRecord, weights_sha256
from models.transformer import Transformer
from models.weights import ModelWeights

from .lint import LintReport, lint_graph
from .opset import EXPORTER_MIN_OPSET, check_requested_opset, lower_opset
from .external_data import plan_external_data, write_external_data, write_inline_graph
from .quantize import SCALE_SUFFIX, check_quantization, dequantize_weights
from .streamed_weights import UnboundInitializer, WeightRecipe, bind_weights, fold_weight_transposes, materialize_small

# Weights up to this size stay inside the graph file (one file to copy); larger ones go to OUTPUT.data
# and are streamed there. protobuf cannot hold more than 2 GiB in one message.
INLINE_GRAPH_BYTES = 512 * 2**20
FOLDABLE_BYTES = 4 * 8192  # initializers the optimizer may fold (its input limit is 8192 elements)


class ExportError(ToolkitError):
    """The export could not produce a valid graph."""


@dataclass
class ExportResult:
    path: Path
    seconds: float
    opset: int
    lint: LintReport
    signature: GraphSignature


class LogitsGraph(nn.Module):
    """What the plain graph computes: logits (always float32) from ids and a padding mask."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids, attention_mask).float()


class DecoderWithPastGraph(nn.Module):
    """The graph with a cache: one call serves the prompt (past length 0) and every decode step."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, past: list[tuple[Tensor, Tensor]]):
        logits, presents = self.model(input_ids, attention_mask, [tuple(layer) for layer in past], use_cache=True)
        return logits.float(), presents


def _example_size(start: int, taken: set[int]) -> int:
    """The first prime >= start that equals no config dimension (so lint can spot it if frozen)."""
    size = start
    while size in taken or any(size % p == 0 for p in range(2, int(size**0.5) + 1)):
        size += 1
    return size


def example_sizes(config: ModelConfig, window: int | None = None) -> dict[str, int]:
    """The trace's batch, sequence and past lengths: sizes no config dimension (nor a static
    window) equals. In a static window the chunk must fit: the sequence is then below it."""
    taken = {config.num_tokens, config.dim, config.depth, config.dim_head, config.heads, config.kv_heads,
             config.ff_hidden, config.dim_inner, config.dim_kv_inner} | ({window} if window else set())
    start = SEQUENCE.example if window is None else min(SEQUENCE.example, max(3, window // 2))
    sequence = _example_size(start, taken)
    past = _example_size(11, taken | {sequence, sequence + 11})
    picked = _example_size(LOGITS_POSITIONS.example, taken | {sequence, past, BATCH.example})
    return {"batch": BATCH.example, "sequence": sequence, "past_sequence": past, "logits_positions": picked}


def check_static_window(config: ModelConfig, window: int) -> None:
    if window < 8:
        raise ExportError(f"--static-cache {window} is too small for the standard-ops graph; give at least 8 tokens")
    if config.max_seq_len and window > config.max_seq_len:
        raise ExportError(f"--static-cache {window} is past the model's max_seq_len {config.max_seq_len}")


def check_output_path(output: Path) -> None:
    parent = output.parent
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"cannot write {output}: {parent} is a file, not a directory; choose another --output")
    if not parent.exists():
        raise ExportError(f"cannot write {output}: directory {parent} does not exist; create it or choose another --output")
    if output.is_dir():
        raise ExportError(f"cannot write {output}: it is a directory; give a file name such as {output / 'model.onnx'}")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress, warnings and rewrite notes; keep them for error messages only."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _static_example_inputs(model: Transformer, signature: GraphSignature, sizes: dict[str, int], row: Precision,
                           max_cache: int):
    """The static-cache graph's trace: rows at different positions writing a chunk each."""
    config = model.config
    batch, seq, picked = sizes["batch"], sizes["sequence"], sizes["logits_positions"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.num_tokens, (batch, seq), generator=generator)
    positions = torch.randint(0, max_cache - seq + 1, (batch,), generator=generator)
    index = torch.randint(0, seq, (batch, picked), generator=generator)
    shape = (batch, config.kv_heads, max_cache, config.dim_head)
    cache = [(torch.randn(shape, generator=generator).to(row.torch_dtype),
              torch.randn(shape, generator=generator).to(row.torch_dtype)) for _ in range(config.depth)]
    axes_of = {spec.name: {i: d for i, d in enumerate(spec.dims) if isinstance(d, str)} for spec in signature.inputs}
    layer_axes = axes_of[signature.cache_inputs[0]]
    dynamic_shapes = {"input_ids": axes_of["input_ids"], "positions": axes_of["positions"],
                      "logits_index": axes_of["logits_index"], "caches": [(layer_axes, layer_axes)] * config.depth}
    examples = {"sequence": seq, "logits_positions": picked}
    return StaticCacheGraph(model), (ids, positions, index, cache), dynamic_shapes, examples


def _example_inputs(model: Transformer, signature: GraphSignature, sizes: dict[str, int], row: Precision):
    """(module to trace, its example arguments, dynamic_shapes, traced axis sizes)."""
    config = model.config
    with_past = signature.with_past
    batch, seq, past = sizes["batch"], sizes["sequence"], sizes["past_sequence"] if with_past else 0
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.num_tokens, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    # String axis names let the exporter infer relations (total_sequence = past_sequence + sequence).
    axes_of = {spec.name: {i: d for i, d in enumerate(spec.dims) if isinstance(d, str)} for spec in signature.inputs}
    dynamic_shapes = {"input_ids": axes_of["input_ids"], "attention_mask": axes_of["attention_mask"]}
    if not with_past:
        return LogitsGraph(model), (ids, mask), dynamic_shapes, {"sequence": seq}
    shape = (batch, config.kv_heads, past, config.dim_head)
    cache = [(torch.randn(shape, generator=generator).to(row.torch_dtype),
              torch.randn(shape, generator=generator).to(row.torch_dtype)) for _ in range(config.depth)]
    layer_axes = axes_of[signature.cache_inputs[0]]
    dynamic_shapes["past"] = [(layer_axes, layer_axes) for _ in range(config.depth)]
    examples = {"sequence": seq, "past_sequence": past, "total_sequence": past + seq}
    return DecoderWithPastGraph(model), (ids, mask, cache), dynamic_shapes, examples


def meta_skeleton(config: ModelConfig, row: Precision) -> Transformer:
    """The model's modules in `row`'s dtype on PyTorch's meta device: shapes, no weights in memory."""
    with torch.device("meta"):
        model = Transformer(config)
    return model.to(row.torch_dtype).use_float32_softmax(row.name != "fp32").eval()


def _on_meta(args):
    return torch.utils._pytree.tree_map(lambda a: a.to("meta") if isinstance(a, Tensor) else a, args)


def trace_to_onnx(weights: ModelWeights, opset: int, precision: str, with_past: bool = False,
                  static_cache: int | None = None, replicate: bool = True):
    """Trace a weightless copy of the model with the torch.onnx dynamo exporter and give each
    initializer a lazy value that reads its weight when written; return (onnx_ir Model, signature,
    example sizes). `static_cache` N: the standard-ops static-cache graph with an N-token window.
    A model deeper than TRACED_DEPTH is traced at that depth and its blocks repeated in the graph
    (export/replicate_layers.py), unless `replicate` is False or the blocks do not correspond."""
    import onnx  # noqa: F401  (fail early with ImportError if missing)

    from .replicate_layers import TRACED_DEPTH, TemplateMismatch, replicate_layers

    row = lookup_precision(precision)
    config = weights.config
    if replicate and config.depth > TRACED_DEPTH:
        try:
            program, examples = _trace(config.replace(depth=TRACED_DEPTH), row, opset, with_past, static_cache)
            replicate_layers(program.model, config.depth)
        except TemplateMismatch:
            program, examples = _trace(config, row, opset, with_past, static_cache)
    else:
        program, examples = _trace(config, row, opset, with_past, static_cache)
    signature = _signature(config, row, with_past, static_cache)
    with _quiet_exporter() as log:
        try:
            aliases = {"head": WeightRecipe("to_logits.weight", dtype=torch.float32)} if static_cache else None
            recipes = bind_weights(program.model, weights, row, aliases)
            fold_weight_transposes(program.model, weights, recipes, row)
            materialize_small(program.model, FOLDABLE_BYTES)
            program.optimize()
        except UnboundInitializer as error:
            raise ExportError(str(error)) from None
        except ToolkitError:  # e.g. non-finite weights, named by the reader
            raise
        except Exception as error:
            raise _exporter_error(error, log) from None
    return program.model, signature, examples


def _trace(config: ModelConfig, row: Precision, opset: int, with_past: bool, static_cache: int | None):
    """(torch.onnx program, example sizes) of the model of `config` on the meta device, unoptimized."""
    model = meta_skeleton(config, row)
    sizes = example_sizes(config, static_cache)
    signature = _signature(config, row, with_past, static_cache)
    if static_cache is not None:
        module, args, dynamic_shapes, examples = _static_example_inputs(model, signature, sizes, row, static_cache)
    else:
        module, args, dynamic_shapes, examples = _example_inputs(model, signature, sizes, row)
    with _quiet_exporter() as log:
        try:
            program = torch.onnx.export(
                module, _on_meta(args), None, input_names=signature.input_names,
                output_names=signature.output_names, opset_version=max(opset, EXPORTER_MIN_OPSET),
                dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False, optimize=False,
            )
        except Exception as error:
            raise _exporter_error(error, log) from None
    return program, examples


def _signature(config: ModelConfig, row: Precision, with_past: bool, static_cache: int | None) -> GraphSignature:
    if static_cache is not None:
        return static_cache_signature(config, static_cache, row.dtype, portable=True)
    return graph_signature(config, with_past, row.dtype)


def _exporter_error(error: Exception, log) -> ExportError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    tail = log.getvalue().strip().splitlines()[-3:]
    return ExportError(f"torch.onnx.export failed: {detail}" + (f" ({' / '.join(tail)})" if tail else ""))


def declared_axes(signature: GraphSignature, config: ModelConfig, window: int | None = None) -> dict[str, dict[str, int]]:
    """The axes' min/opt/max as recorded for build-engine; none past the trained context, nor
    (static-cache graphs) past the window."""
    axes = {name: {"min": a.min, "opt": a.opt, "max": a.max} for name, a in signature.axes.items()}
    limit = min(x for x in (config.max_seq_len, window) if x) if (config.max_seq_len or window) else None
    if limit:
        for name in ("sequence", "past_sequence", "logits_positions"):
            if name in axes:
                axes[name]["max"] = min(axes[name]["max"], limit)
                axes[name]["opt"] = min(axes[name]["opt"], axes[name]["max"])
    return axes


def exporter_description() -> str:
    import onnx
    import onnxscript

    return f"torch.onnx dynamo (torch {torch.__version__}, onnxscript {onnxscript.__version__}, onnx {onnx.__version__})"


def weights_record(weights: ModelWeights, record: "WeightsRecord | PendingRecord | None") -> WeightsRecord:
    """The record an export writes: as given (waiting for a checkpoint's hash if it is still being
    computed), or the in-memory weights' own hash."""
    if isinstance(record, PendingRecord):
        return record.resolve()
    return record or WeightsRecord("in-memory model", weights_sha256(weights.tensors))


def graph_metadata(weights: ModelWeights | Transformer, signature: GraphSignature, opset: int, precision: str,
                   record: WeightsRecord | None, static_cache: int | None = None,
                   quantization: QuantizationRecord | None = None) -> GraphMetadata:
    weights = weights if isinstance(weights, ModelWeights) else ModelWeights.of(weights)
    kind = STATIC_PORTABLE if static_cache else WITH_PAST if signature.with_past else LOGITS
    return GraphMetadata(
        kind=kind, precision=lookup_precision(precision).name, max_cache=static_cache,
        config=weights.config, weights=weights_record(weights, record),
        axes=declared_axes(signature, weights.config, static_cache),
        opset=opset, exporter=exporter_description(), torch_version=torch.__version__,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), quantization=quantization)


def tensor_bytes(tensor) -> int:
    """Bytes a tensor's data takes as stored (int4 packed two to a byte), also when it is external."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_location == TensorProto.EXTERNAL:
        return int({entry.key: entry.value for entry in tensor.external_data}.get("length", 0))
    return len(tensor.raw_data) if tensor.raw_data else numpy_helper.to_array(tensor).nbytes


def initializer_bytes(proto) -> int:
    """Bytes of a graph's initializers: its weights, quantization scales included."""
    return sum(tensor_bytes(t) for t in proto.graph.initializer)


def graph_weight_bytes(path: str | os.PathLike) -> int:
    """initializer_bytes of an ONNX file, read without loading external data."""
    import onnx

    return initializer_bytes(onnx.load(str(path), load_external_data=False))


def build_portable_static_graph(model: Transformer, max_cache: int, precision: str = "fp32",
                                weights: WeightsRecord | None = None, opset: int = 17):
    """The standard-ops static-cache graph as an onnx.ModelProto, in memory (for benchmarks)."""
    import onnx_ir as ir

    check_static_window(model.config, max_cache)
    source = ModelWeights.of(model)
    graph, signature, _ = trace_to_onnx(source, opset, precision, static_cache=max_cache)
    proto = lower_opset(ir.serde.serialize_model(graph), opset)
    graph_metadata(source, signature, opset, precision, weights, max_cache).write(proto)
    return proto


def ir_serialize(graph):
    """The onnx_ir model as a ModelProto (weights pointed into external data stay there, unread)."""
    import onnx_ir as ir

    return ir.serde.serialize_model(graph)


def save_proto(proto, path: Path) -> None:
    # one serialized copy; onnx.save_model held about four times the graph's size at its peak
    path.write_bytes(proto.SerializeToString())


def _as_ir(graph):
    """trace_to_onnx's graph as an onnx_ir Model (a ModelProto is accepted too)."""
    import onnx_ir as ir

    return graph if isinstance(graph, ir.Model) else ir.serde.deserialize_model(graph)


def _check_written(graph: Path) -> None:
    import onnx

    try:  # check the file as written (a path also works for external data)
        onnx.checker.check_model(str(graph), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"onnx.checker rejected the exported graph: {str(error).splitlines()[0]}") from None


def commit(written: list[Path], output: Path) -> None:
    """Move the staged files into place (graph last); drop a stale external-data file."""
    stale_data = output.with_name(output.name + ".data")
    if len(written) == 1 and stale_data.exists():
        stale_data.unlink()  # a data file left by an earlier, larger export of this name
    for path in written:
        os.chmod(path, new_file_mode())
        os.replace(path, output.parent / path.name)


def _bytes_text(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def write_graph(graph, path: Path, opset: int, metadata: GraphMetadata, lint, allow_lint: bool,
                log, check=None) -> tuple[list[Path], LintReport]:
    """Serialize, stamp and lint the graph before reading any weight, then stream the weights into
    the graph file (or PATH.data when they pass INLINE_GRAPH_BYTES) and `check(path)` it (default:
    onnx.checker); return the files written (the graph last) and the lint report."""
    data_path = path.with_name(path.name + ".data")
    # nothing is read yet; quantization scales (a sixteenth of int4 weights at most) stay in the
    # graph, where the lint reads them
    planned = plan_external_data(graph, path.parent, data_path.name, keep=lambda name: name.endswith(SCALE_SUFFIX))
    external = sum(item.length for item in planned) > INLINE_GRAPH_BYTES
    with phase(log, "serializing the graph", ""):
        proto = lower_opset(ir_serialize(graph), opset)
    metadata.write(proto)
    report = lint(proto)
    log(report.format())
    if report.findings and not allow_lint:
        raise ExportError(f"export lint found {len(report.findings)} problem(s), first: {report.findings[0]}; "
                          "fix the model code or pass --allow-lint")
    size, where = _bytes_text(sum(item.length for item in planned)), data_path.name if external else path.name
    with phase(log, "writing the weights", f"writing {size} of weights to {where}, one tensor at a time ..."):
        if external:
            write_external_data(planned, data_path)
            save_proto(proto, path)
        else:
            write_inline_graph(proto, planned, path)
    del proto  # the checker reads the file; do not hold a second graph meanwhile
    with phase(log, "checking the graph", ""):
        (check or _check_written)(path)
    return ([data_path] if external else []) + [path], report  # data first: the graph is renamed last


def export_onnx(model: Transformer | ModelWeights, output: str | os.PathLike, opset: int | None = None,
                precision: str = "fp32", weights: "WeightsRecord | PendingRecord | None" = None, allow_lint: bool = False,
                verify=None, log=print, with_past: bool = False, static_cache: int | None = None) -> ExportResult:
    """Export `model` (a Transformer, or ModelWeights read lazily from a checkpoint) to `output`;
    `weights` names the weights in the metadata (ModelSource.record). `static_cache` N writes the
    standard-ops static-cache graph (an N-token window per row). A quantized `precision` row
    (fp16-int4-b32) writes its weights as DequantizeLinear -> MatMul; `opset` None is the lowest
    that expresses the graph.

    The model is traced without its weights, and each weight is read and written one at a time,
    so memory stays near one tensor's size whatever the model's. Graphs whose weights pass
    INLINE_GRAPH_BYTES keep them in OUTPUT.data beside the graph.

    Lint findings (unless allowed) or a failed `verify(path)` callback raise ExportError
    and leave no file behind."""
    output = Path(output)
    source = model if isinstance(model, ModelWeights) else ModelWeights.of(model)
    row = lookup_precision(precision)
    skeleton = meta_skeleton(source.config, row.float_row)
    opset = check_quantization(skeleton, row, opset)
    check_requested_opset(opset)
    check_output_path(output)
    started = time.perf_counter()
    if static_cache is not None:
        check_static_window(source.config, static_cache)
        if row.scheme:
            raise ExportError("the standard-ops static-cache graph is not quantized yet; quantize the GroupQueryAttention "
                              "graph (drop --portable) or the --with-past graph")
    kind = ("static-cache decoder (standard ops)" if static_cache else "decoder with past" if with_past else "decoder")
    with phase(log, "tracing the model", f"exporting {weights.description if weights else 'model'} as a {kind} to "
                                         f"ONNX opset {opset} ({row.name}): tracing ..."):
        graph, signature, examples = trace_to_onnx(source, opset, row.float_row.name, with_past, static_cache)
        graph = _as_ir(graph)
    record = dequantize_weights(graph, skeleton, source, row) if row.scheme else None
    metadata = graph_metadata(source, signature, opset, row.name, weights, static_cache, record)
    # Everything is written into a hidden folder beside OUTPUT and moved into place only once
    # checked and verified, so a failure leaves the previous export (graph and data) untouched.
    with staging_folder(output) as folder:
        written, report = write_graph(graph, folder / output.name, opset, metadata,
                                       lambda proto: lint_graph(proto, signature, examples), allow_lint, log)
        seconds = time.perf_counter() - started
        if verify is not None:
            verify(written[-1])
        commit(written, output)
    return ExportResult(output, seconds, opset, report, signature)
