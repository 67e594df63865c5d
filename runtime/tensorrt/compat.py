"""Which GPUs each TensorRT flavour can run engines on, and engine/host compatibility checks."""
from __future__ import annotations

from models.errors import ToolkitError

from .engine_files import Sidecar

# TensorRT-RTX builds on any recent GPU but executes only on these compute capabilities
# (measured: it refuses to run on 9.0, Hopper). TensorRT 10/11 needs 7.5 or newer.
RTX_RUNNABLE = {(8, 0), (8, 6), (8, 9)}  # and every 12.x
TENSORRT_MIN_CC = (7, 5)


class EngineIncompatible(ToolkitError):
    """An engine that cannot run with this library or on this GPU."""


def cc_tuple(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def can_execute(flavour: str, compute_capability: str) -> tuple[bool, str]:
    """Whether `flavour` can execute engines on a GPU of this compute capability, and why not."""
    cc = cc_tuple(compute_capability)
    if flavour == "tensorrt-rtx" and cc not in RTX_RUNNABLE and cc[0] != 12:
        return False, (f"TensorRT-RTX does not run engines on compute capability {compute_capability} "
                       "(it runs on 8.0, 8.6, 8.9 and 12.x); use the full TensorRT on this GPU")
    if flavour == "tensorrt" and cc < TENSORRT_MIN_CC:
        return False, f"TensorRT 10+ does not support compute capability {compute_capability} (needs 7.5 or newer)"
    return True, ""


def check_engine_runs_here(sidecar: Sidecar, flavour: str, library_version: str, gpu_name: str,
                           compute_capability: str) -> None:
    """Refuse an engine from another library, version or GPU, unless it was built compatible."""
    options = sidecar.options
    if sidecar.flavour != flavour:
        raise EngineIncompatible(
            f"the engine was built with {sidecar.flavour}, but {flavour} is loaded; run it with {sidecar.flavour} "
            "or rebuild it with build-engine"
        )
    if sidecar.library_version != library_version and not options.get("version_compatible"):
        raise EngineIncompatible(
            f"the engine was built with {flavour} {sidecar.library_version} but {library_version} is installed; "
            "rebuild it with build-engine (or build with --version-compatible)"
        )
    if sidecar.compute_capability != compute_capability and options.get("hardware_compatibility", "none") == "none":
        raise EngineIncompatible(
            f"the engine was built for {sidecar.gpu_name} (compute capability {sidecar.compute_capability}) but this "
            f"GPU is {gpu_name} ({compute_capability}); rebuild it here, or build with --hardware-compatibility ampere+"
        )
    runnable, reason = can_execute(flavour, compute_capability)
    if not runnable:
        raise EngineIncompatible(reason)
