"""The boards and JetPack releases `package-edge` packs for, as data. Values not confirmed by a
source found while writing this are listed in each row's `unconfirmed` and repeated in every
bundle's README and manifest: measure them on the board before relying on them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from models.errors import ToolkitError

# Usable memory = module memory - carve-outs and kernel - a headless OS. An Orin NX 16GB reports
# 14486 MiB of its 16384 to CUDA (deviceQuery), 1.85 GiB gone before any process; a headless L4T
# with its services takes about 0.75 GiB more (an assumption: check `free -m` / tegrastats).
RESERVED_GIB = 2.6
USABLE_ASSUMPTION = (f"usable memory = module memory - {RESERVED_GIB} GiB: ~1.85 GiB of carve-outs and kernel "
                     "(an Orin NX 16GB shows 14486 MiB to CUDA) plus ~0.75 GiB for a headless L4T; a desktop "
                     "session takes 1-2 GiB more. Measure with `free -m` and pass --usable-gib")


class EdgeError(ToolkitError):
    """A bundle that cannot be made: unknown board, a graph the JetPack cannot take, a model that does not fit."""


@dataclass(frozen=True)
class EdgeTarget:
    name: str  # --target spelling
    module: str
    memory_gib: float  # LPDDR5, shared by CPU and GPU
    bandwidth_gbs: float  # GB/s
    sms: int  # GPU streaming multiprocessors (CUDA cores / 128)
    compute_capability: str = "8.7"  # every Orin (sm_87)
    unconfirmed: tuple[str, ...] = ()  # fields from memory of NVIDIA's module table, not a source read
    note: str = ""

    @property
    def usable_gib(self) -> float:
        return self.memory_gib - RESERVED_GIB

    def to_dict(self) -> dict:
        return {**asdict(self), "usable_gib": self.usable_gib, "usable_assumption": USABLE_ASSUMPTION}


# NVIDIA's module figures as quoted by the Ultralytics Jetson guide; rows marked unconfirmed are from
# NVIDIA's module table as remembered, not a source read for this table.
TARGETS: dict[str, EdgeTarget] = {t.name: t for t in (
    EdgeTarget("orin-agx-64gb", "Jetson AGX Orin 64GB", 64, 204.8, 16),
    EdgeTarget("orin-agx-32gb", "Jetson AGX Orin 32GB", 32, 204.8, 14, unconfirmed=("bandwidth_gbs", "sms")),
    EdgeTarget("orin-nx-16gb", "Jetson Orin NX 16GB", 16, 102.4, 8),
    EdgeTarget("orin-nx-8gb", "Jetson Orin NX 8GB", 8, 102.4, 8, unconfirmed=("bandwidth_gbs", "sms")),
    EdgeTarget("orin-nano-8gb", "Jetson Orin Nano 8GB", 8, 68.0, 8,
               note="JetPack 6.2's MAXN SUPER mode raises bandwidth to 102 GB/s (unconfirmed)"),
)}


@dataclass(frozen=True)
class JetPack:
    version: str  # --jetpack spelling
    l4t: str
    cuda: str
    tensorrt: str
    max_opset: int  # the newest ONNX opset its TensorRT's parser documents
    weak_typing: str  # what --precision fp16|bf16 (weak typing) means there; bundles always build strongly typed
    sources: tuple[str, ...]
    unconfirmed: dict[str, str] = field(default_factory=dict)  # field -> why it is not confirmed

    def confirmed(self, name: str) -> bool:
        return name not in self.unconfirmed

    def to_dict(self) -> dict:
        return asdict(self)


JETPACKS: dict[str, JetPack] = {j.version: j for j in (
    JetPack("6.2", "36.4.3", "12.6", "10.3", 20, "available (deprecated only from TensorRT 10.12)",
            sources=("dusty-nv/jetson-containers l4t_version.py (L4T 36.4.3, CUDA 12.6 -> TensorRT 10.3)",
                     "NVIDIA/TensorRT NvInfer.h v10.3.0: kSTRONGLY_TYPED; block-wise INT4 IDequantizeLayer on weights",
                     "onnx-tensorrt docs/operators.md 10.0/10.1: opset 9 to 20"),
            unconfirmed={"tensorrt": "not read on an NVIDIA JetPack 6.2 page",
                         "max_opset": "TensorRT 10.3's own operator list was not read; its parser checks only the "
                                      "minimum opset, so opset-21 graphs (int4) may still parse"}),
    JetPack("7.2", "39.x", "13.x", "10.13", 24, "deprecated (TensorRT 10.12+), gone in TensorRT 11",
            sources=("dusty-nv/jetson-containers l4t_version.py: JetPack 7.2 on L4T 39, CUDA 13 for Orin (sm_87)",
                     "NVIDIA JetPack page: JetPack 7 supports Jetson Orin and Thor",
                     "TensorRT 10.13 operators: opset 9 to 24"),
            unconfirmed={"l4t": "NVIDIA's JetPack 7.2 release notes were not found",
                         "cuda": "NVIDIA's JetPack 7.2 release notes were not found",
                         "tensorrt": "10.13 is jetson-containers' default for CUDA 13; TensorRT 11 is possible",
                         "max_opset": "follows from the unconfirmed TensorRT version"}),
)}


def edge_target(name: str) -> EdgeTarget:
    if name not in TARGETS:
        raise EdgeError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


def jetpack(version: str) -> JetPack:
    if version not in JETPACKS:
        raise EdgeError(f"unknown JetPack {version!r}; choose one of {', '.join(JETPACKS)}")
    return JETPACKS[version]
