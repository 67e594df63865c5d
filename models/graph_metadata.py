"""What an exported graph records about itself, as one typed record.

Written into the ONNX `metadata_props` at export (`GraphMetadata.write`), read back by every
command that opens a graph (`read_graph_metadata`, `GraphMetadata.from_props`), and carried
into engine sidecars. Nothing else spells these keys.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import ConfigError, ModelConfig
from .errors import ToolkitError
from .precision import WEIGHT_SCHEMES, PrecisionError, precision, quantized
from .signature import GraphSignature, graph_signature, static_cache_signature

TOOLKIT_VERSION = "0.1.0"
PRODUCER = "rotary-transformer-toolkit"
LOGITS, WITH_PAST, STATIC_CACHE, STATIC_PORTABLE = "logits", "with-past", "static-cache", "static-cache-portable"
GRAPH_KINDS = {
    LOGITS: "logits from ids and a padding mask",
    WITH_PAST: "decoder with a key/value cache fed back each step (portable: ONNX Runtime and TensorRT)",
    STATIC_CACHE: "ONNX Runtime fast decoder over a static key/value cache (GroupQueryAttention)",
    STATIC_PORTABLE: "decoder over a static key/value cache in standard ONNX ops (ONNX Runtime and TensorRT)",
}
STATIC_KINDS = (STATIC_CACHE, STATIC_PORTABLE)
_STATIC_KIND_TAG = "onnxruntime-static-cache"  # graph_kind as written by earlier releases
# How quantized weights are stored, and the formulas that make them (export/quantize.py
# implements each by this name; the fake-quantized reference uses the same one).
QUANT_FORMATS = {
    "qdq": "int8/int4 initializers -> DequantizeLinear -> MatMul (standard ONNX; TensorRT and ONNX Runtime)",
    "matmulnbits": "com.microsoft.MatMulNBits (ONNX Runtime), written by onnxruntime.quantization",
}
SCALE_FORMULAS = {
    "absmax": "scale = max|w| / (2^(bits-1) - 1) per output channel or block, positive; "
              "q = round_half_even(w / scale) clipped to [-2^(bits-1), 2^(bits-1) - 1]",
    "ort-mlas": "ONNX Runtime MatMulNBits symmetric: m = the block's signed weight of largest magnitude, "
                "scale = -m / 2^(bits-1); q = floor(w / scale + 2^(bits-1) + 0.5) clipped to [0, 2^bits - 1], "
                "zero point 2^(bits-1)",
}


class GraphMetadataError(ToolkitError, ValueError):
    """A graph that is not this toolkit's, or whose metadata is damaged."""


@dataclass(frozen=True)
class WeightsRecord:
    """Which weights a graph was made from: enough to find or rebuild them and to prove it."""

    description: str  # "preset tiny (seed 0)" or a checkpoint path
    sha256: str
    preset: str | None = None  # set when the weights were generated from a preset
    seed: int | None = None


@dataclass(frozen=True)
class QuantizationRecord:
    """How a graph's matrix weights were quantized: enough to rebuild the same weights in PyTorch."""

    scheme: str  # a models.precision.WEIGHT_SCHEMES name: int8, int4
    block_size: int | None  # input rows per scale; None: one scale per output channel
    format: str  # one of QUANT_FORMATS
    formula: str  # one of SCALE_FORMULAS
    layers: tuple[str, ...]  # the PyTorch model's Linear modules whose weights are quantized

    @property
    def bits(self) -> int:
        return WEIGHT_SCHEMES[self.scheme].bits

    def describe(self) -> str:
        blocks = f"blocks of {self.block_size}" if self.block_size else "per output channel"
        return f"{self.scheme} ({blocks}, {self.format}, {self.formula} scales, {len(self.layers)} layers)"

    def to_json(self) -> str:
        return json.dumps({"scheme": self.scheme, "bits": self.bits, "block_size": self.block_size,
                           "format": self.format, "formula": self.formula, "layers": list(self.layers)})

    @classmethod
    def from_json(cls, text: str) -> "QuantizationRecord":
        data = json.loads(text)
        record = cls(data["scheme"], data["block_size"], data["format"], data["formula"], tuple(data["layers"]))
        if record.scheme not in WEIGHT_SCHEMES or record.format not in QUANT_FORMATS \
                or record.formula not in SCALE_FORMULAS or not all(isinstance(n, str) for n in record.layers):
            raise ValueError(f"unknown quantization {text[:80]!r}")
        return record


@dataclass(frozen=True)
class GraphMetadata:
    kind: str  # one of GRAPH_KINDS
    precision: str  # a models.precision name: fp32, fp16, bf16, or a quantized row such as fp16-int4-b32
    config: ModelConfig
    weights: WeightsRecord
    axes: dict[str, dict[str, int]] = field(default_factory=dict)  # axis -> {"min", "opt", "max"}
    max_cache: int | None = None  # static-cache graphs: tokens each row's cache holds
    opset: int = 17
    exporter: str = ""
    torch_version: str = ""
    toolkit_version: str = TOOLKIT_VERSION
    exported_at: str = ""
    quantization: QuantizationRecord | None = None  # weight-only quantized graphs

    @property
    def with_past(self) -> bool:
        return self.kind != LOGITS

    @property
    def capacity(self) -> int | None:
        """Tokens one row holds (prompt + generated): the static cache, or max_seq_len; None: unbounded."""
        return self.max_cache if self.kind in STATIC_KINDS else self.config.max_seq_len

    def signature(self) -> GraphSignature:
        """The graph's inputs and outputs, as export declared them."""
        dtype = precision(self.precision).dtype
        if self.kind in STATIC_KINDS:
            return static_cache_signature(self.config, self.max_cache or 1, dtype, portable=self.kind == STATIC_PORTABLE)
        return graph_signature(self.config, self.kind == WITH_PAST, dtype)

    def replace(self, **changes) -> "GraphMetadata":
        return replace(self, **changes)

    def to_props(self) -> dict[str, str]:
        props = {
            "graph_kind": self.kind, "model_config": self.config.to_json(), "precision": precision(self.precision).dtype,
            "with_past": str(self.with_past).lower(), "opset": str(self.opset),
            "checkpoint_sha256": self.weights.sha256, "source": self.weights.description,
            "torch_version": self.torch_version, "exporter": self.exporter, "toolkit_version": self.toolkit_version,
            "exported_at": self.exported_at,
        }
        if self.weights.preset is not None:
            props.update(source_preset=self.weights.preset, source_seed=str(self.weights.seed))
        if self.axes:
            props["axes"] = json.dumps(self.axes, sort_keys=True)
        if self.max_cache is not None:
            props["max_cache"] = str(self.max_cache)
        if self.quantization is not None:
            props["quantization"] = self.quantization.to_json()
        return props

    def write(self, proto) -> None:
        """Replace `proto`'s metadata_props with this record and stamp the producer."""
        del proto.metadata_props[:]
        for key, value in self.to_props().items():
            proto.metadata_props.add(key=key, value=value)
        proto.producer_name, proto.producer_version = PRODUCER, self.toolkit_version

    @classmethod
    def from_props(cls, props: dict[str, str], where: str = "the graph") -> "GraphMetadata":
        """Parse metadata_props; a graph without this toolkit's keys is refused in one sentence."""
        if "model_config" not in props:
            raise GraphMetadataError(f"{where} is not a graph written by this toolkit (it has no model_config "
                                     "metadata); export it with export-model")
        try:
            record = QuantizationRecord.from_json(props["quantization"]) if "quantization" in props else None
            row = precision(props.get("precision", "float32"))
            if record is not None:  # "precision" holds the activations' dtype, readable by earlier releases
                row = quantized(row.name, record.scheme, record.block_size)
            return cls(kind=_kind(props), precision=row.name,
                       config=ModelConfig.from_json(props["model_config"]), weights=_weights(props),
                       axes=_axes(props), max_cache=_optional_int(props, "max_cache"),
                       opset=_optional_int(props, "opset") or 17, exporter=props.get("exporter", ""),
                       torch_version=props.get("torch_version", ""),
                       toolkit_version=props.get("toolkit_version", ""), exported_at=props.get("exported_at", ""),
                       quantization=record)
        except (ConfigError, PrecisionError, ValueError, TypeError, KeyError) as error:
            raise GraphMetadataError(f"{where} has damaged toolkit metadata ({error}); export it again") from None


def _kind(props: dict[str, str]) -> str:
    kind = props.get("graph_kind")
    if kind == _STATIC_KIND_TAG:
        return STATIC_CACHE
    if kind is None:
        return WITH_PAST if props.get("with_past") == "true" else LOGITS
    if kind not in GRAPH_KINDS:
        raise ValueError(f"unknown graph_kind {kind!r}")
    return kind


def _weights(props: dict[str, str]) -> WeightsRecord:
    seed = props.get("source_seed")
    if seed is not None and not seed.isdigit():
        raise ValueError(f"source_seed {seed!r} is not a non-negative integer")
    return WeightsRecord(props.get("source", "unknown weights"), props.get("checkpoint_sha256", ""),
                         props.get("source_preset"), None if seed is None else int(seed))


def _axes(props: dict[str, str]) -> dict[str, dict[str, int]]:
    axes = json.loads(props.get("axes", "{}"))
    if not isinstance(axes, dict) or not all(
            isinstance(v, dict) and all(isinstance(v.get(k), int) for k in ("min", "opt", "max")) for v in axes.values()):
        raise ValueError("axes must map axis names to {min, opt, max} integers")
    return axes


def _optional_int(props: dict[str, str], key: str) -> int | None:
    return None if key not in props else int(props[key])


def read_graph_metadata(path: str | Path) -> GraphMetadata:
    """The metadata of an ONNX file, read without its weights' external data."""
    return GraphMetadata.from_props(read_props(path), str(path))


def read_props(path: str | Path) -> dict[str, str]:
    """An ONNX file's metadata_props; one clear error for a missing file or bytes that are not ONNX."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise GraphMetadataError(f"ONNX model not found: {path}" if not path.exists() else
                                 f"{path} is a directory; pass the .onnx file")
    if path.stat().st_size == 0:
        raise GraphMetadataError(f"{path} is empty (0 bytes): a copy or download that did not finish? export it again")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError, or RuntimeWarning-like errors for garbage
        detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        if path.suffix.lower() not in ("", ".onnx"):  # another kind of file given for the graph
            raise GraphMetadataError(f"cannot read {path}: not an ONNX graph ({detail}); give the .onnx file "
                                     "export-model wrote") from None
        raise GraphMetadataError(f"cannot read {path}: not a valid ONNX file ({detail}); export it again") from None
    return {p.key: p.value for p in model.metadata_props}
