"""PyTorch -> ONNX with symbolic batch and sequence axes, metadata, lint and verification."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

from models.errors import ToolkitError
from models.files import new_file_mode
from models.config import ModelConfig
from models.signature import BATCH, SEQUENCE, GraphSignature, graph_signature
from models.transformer import Transformer

from .lint import LintReport, lint_graph
from .opset import EXPORTER_MIN_OPSET, check_requested_opset, lower_opset

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot hold more than 2 GiB in one message
TOOLKIT_VERSION = "0.1.0"


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


def example_sizes(config: ModelConfig) -> dict[str, int]:
    """The trace's batch, sequence and past lengths: sizes no config dimension equals."""
    taken = {config.num_tokens, config.dim, config.depth, config.dim_head, config.heads, config.kv_heads,
             config.ff_hidden, config.dim_inner, config.dim_kv_inner}
    sequence = _example_size(SEQUENCE.example, taken)
    past = _example_size(11, taken | {sequence, sequence + 11})
    return {"batch": BATCH.example, "sequence": sequence, "past_sequence": past}


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


def trace_to_onnx(model: Transformer, opset: int, dtype: str, with_past: bool = False):
    """Run the torch.onnx dynamo exporter; return (ModelProto, signature, example sizes)."""
    import onnx  # noqa: F401  (fail early with ImportError if missing)

    config = model.config
    signature = graph_signature(config, with_past, PRECISION_NAMES[dtype])
    sizes = example_sizes(config)
    batch, seq, past = sizes["batch"], sizes["sequence"], sizes["past_sequence"] if with_past else 0
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.num_tokens, (batch, seq), generator=generator)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    if dtype != "fp32":
        model = copy.deepcopy(model).to(DTYPES[dtype]).use_float32_softmax()
    # String axis names let the exporter infer relations (total_sequence = past_sequence + sequence).
    axes_of = {spec.name: {i: d for i, d in enumerate(spec.dims) if isinstance(d, str)} for spec in signature.inputs}
    if with_past:
        shape = (batch, config.kv_heads, past, config.dim_head)
        cache = [(torch.randn(shape, generator=generator).to(DTYPES[dtype]),
                  torch.randn(shape, generator=generator).to(DTYPES[dtype])) for _ in range(config.depth)]
        module, args = DecoderWithPastGraph(model.eval()), (ids, mask, cache)
        layer_axes = axes_of["past_key_values.0.key"]
        dynamic_shapes = {"input_ids": axes_of["input_ids"], "attention_mask": axes_of["attention_mask"],
                          "past": [(layer_axes, layer_axes) for _ in range(config.depth)]}
        examples = {"sequence": seq, "past_sequence": past, "total_sequence": past + seq}
    else:
        module, args = LogitsGraph(model.eval()), (ids, mask)
        dynamic_shapes = {"input_ids": axes_of["input_ids"], "attention_mask": axes_of["attention_mask"]}
        examples = {"sequence": seq}
    with _quiet_exporter() as log:
        try:
            program = torch.onnx.export(
                module, args, None, input_names=signature.input_names,
                output_names=signature.output_names, opset_version=max(opset, EXPORTER_MIN_OPSET),
                dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False, optimize=True,
            )
            proto = program.model_proto
        except Exception as error:
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            tail = log.getvalue().strip().splitlines()[-3:]
            raise ExportError(f"torch.onnx.export failed: {detail}" + (f" ({' / '.join(tail)})" if tail else "")) from None
    return lower_opset(proto, opset), signature, examples


def add_metadata(proto, model: Transformer, signature: GraphSignature, opset: int, dtype: str,
                 source: dict[str, str]) -> None:
    import onnx
    import onnxscript

    axes = {name: {"min": a.min, "opt": a.opt, "max": a.max} for name, a in signature.axes.items()}
    if model.config.max_seq_len:  # no profile past the trained context
        for name in ("sequence", "past_sequence"):
            if name in axes:
                axes[name]["max"] = min(axes[name]["max"], model.config.max_seq_len)
                axes[name]["opt"] = min(axes[name]["opt"], axes[name]["max"])
    props = {
        "model_config": model.config.to_json(),
        **source,
        "precision": PRECISION_NAMES[dtype],
        "with_past": str(signature.with_past).lower(),
        "opset": str(opset),
        "torch_version": torch.__version__,
        "exporter": f"torch.onnx dynamo (torch {torch.__version__}, onnxscript {onnxscript.__version__}, onnx {onnx.__version__})",
        "axes": json.dumps(axes, sort_keys=True),
        "toolkit_version": TOOLKIT_VERSION,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "rotary-transformer-toolkit", TOOLKIT_VERSION


def _save(proto, folder: Path, name: str) -> list[Path]:
    """Write the graph (and, over 2 GB, its external data) into `folder`; return the files written."""
    import onnx

    graph = folder / name
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=name + ".data", size_threshold=1024)
        return [graph.with_name(name + ".data"), graph]  # data first: the graph is renamed last
    onnx.save_model(proto, str(graph))
    return [graph]


def export_onnx(model: Transformer, output: str | os.PathLike, opset: int = 17, dtype: str = "fp32",
                source: dict[str, str] | None = None, allow_lint: bool = False,
                verify=None, log=print, with_past: bool = False) -> ExportResult:
    """Export `model` to `output`; `source` is metadata naming the weights (ModelSource.metadata()).

    Lint findings (unless allowed) or a failed `verify(path)` callback raise ExportError
    and leave no file behind."""
    import onnx

    output = Path(output)
    check_requested_opset(opset)
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    check_output_path(output)
    started = time.perf_counter()
    source = source or {}
    kind = "decoder with past" if with_past else "decoder"
    log(f"exporting {source.get('source', 'model')} as a {kind} to ONNX opset {opset} ({dtype}) ...")
    proto, signature, examples = trace_to_onnx(model, opset, dtype, with_past)
    add_metadata(proto, model, signature, opset, dtype, source)
    report = lint_graph(proto, signature, examples)
    log(report.format())
    if report.findings and not allow_lint:
        raise ExportError(f"export lint found {len(report.findings)} problem(s), first: {report.findings[0]}; "
                          "fix the model code or pass --allow-lint")
    # Everything is written into a hidden folder beside OUTPUT and moved into place only once
    # checked and verified, so a failure leaves the previous export (graph and data) untouched.
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as folder:
        written = _save(proto, Path(folder), output.name)
        graph = written[-1]
        try:  # check the file as written (a path also works for external data)
            onnx.checker.check_model(str(graph), full_check=True)
        except onnx.checker.ValidationError as error:
            raise ExportError(f"onnx.checker rejected the exported graph: {str(error).splitlines()[0]}") from None
        seconds = time.perf_counter() - started
        if verify is not None:
            verify(graph)
        stale_data = output.with_name(output.name + ".data")
        if len(written) == 1 and stale_data.exists():
            stale_data.unlink()  # a data file left by an earlier, larger export of this name
        for path in written:
            os.chmod(path, new_file_mode())
            os.replace(path, output.parent / path.name)
    return ExportResult(output, seconds, opset, report, signature)
