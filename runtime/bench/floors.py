"""Physical lower bounds for a step: bytes over memory bandwidth, FLOPs over peak throughput."""
from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig
from models.precision import Precision


@dataclass(frozen=True)
class GpuPeaks:
    name: str
    bandwidth: float  # bytes/s
    half_flops: float  # dense fp16/bf16 tensor-core FLOP/s
    fp32_flops: float  # FP32 without TF32


# Vendor datasheet figures (dense, no sparsity), matched by substring of the device name.
GPU_PEAKS = (
    GpuPeaks("H200", 4.8e12, 989e12, 67e12),
    GpuPeaks("H100 80GB HBM3", 3.35e12, 989e12, 67e12),  # SXM
    GpuPeaks("H100 PCIe", 2.0e12, 756e12, 51e12),
    GpuPeaks("A100-SXM4-80GB", 2.039e12, 312e12, 19.5e12),
    GpuPeaks("A100", 1.555e12, 312e12, 19.5e12),
    GpuPeaks("L4", 0.3e12, 121e12, 30.3e12),
    GpuPeaks("RTX 4090", 1.008e12, 165.2e12, 82.6e12),
    GpuPeaks("Orin", 0.2048e12, 85e12, 5.3e12),  # Jetson AGX Orin 64GB
)


def peaks_for(device_name: str) -> GpuPeaks | None:
    return next((p for p in GPU_PEAKS if p.name.lower() in device_name.lower()), None)


def matmul_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(input, output) size of every matrix a token passes through: per layer the QKV and output
    projections and the feed-forward pair, then the logits head (last). Not the embedding."""
    per_layer = [(config.dim, config.dim_inner + 2 * config.dim_kv_inner), (config.dim_inner, config.dim),
                 (config.dim, config.ff_hidden), (config.ff_hidden, config.dim)]
    return per_layer * config.depth + [(config.dim, config.num_tokens)]


def matmul_params(config: ModelConfig) -> int:
    """Weights read by matrix multiplies per token: projections, feed-forward, logits (not the embedding)."""
    return sum(rows * columns for rows, columns in matmul_shapes(config))


def matmul_bytes(config: ModelConfig, precision: Precision) -> float:
    """Bytes of those weights in `precision`, quantization scales included; a quantized row's
    scheme says whether the logits head is quantized or stays in the activations' precision."""
    *blocks, head = matmul_shapes(config)
    head_row = precision if precision.scheme is None or precision.scheme.head else precision.float_row
    return sum(precision.matrix_bytes(*shape) for shape in blocks) + head_row.matrix_bytes(*head)


def prefill_flops(config: ModelConfig, batch: int, context: int) -> float:
    """Matmul FLOPs of a causal prefill: 2 per weight per token, plus QK^T and AV over the causal half."""
    attention = config.depth * 2 * batch * config.heads * config.dim_head * context * context  # 2 * (2 b h d n^2 / 2)
    return 2.0 * matmul_params(config) * batch * context + attention


def decode_bytes(config: ModelConfig, batch: int, context: int, precision: Precision) -> float:
    """Bytes one decode step must read: every matmul weight once, and the whole key/value cache."""
    cache = 2 * config.depth * batch * config.kv_heads * config.dim_head * context
    return matmul_bytes(config, precision) + cache * precision.bytes_per_value


def decode_floor_seconds(config: ModelConfig, batch: int, context: int, precision: Precision, peaks: GpuPeaks) -> float:
    return decode_bytes(config, batch, context, precision) / peaks.bandwidth


def prefill_floor_seconds(config: ModelConfig, batch: int, context: int, precision: Precision,
                          peaks: GpuPeaks) -> float:
    return prefill_flops(config, batch, context) / (peaks.half_flops if precision.tensor_cores else peaks.fp32_flops)
