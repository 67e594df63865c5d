"""Which GPUs `generate` runs on (`--gpus`), as Triton expresses it: an instance group of kind
KIND_GPU, `count` instances on each listed GPU. Each GPU gets its own decode process (its own
decoder, rows and CUDA graphs), and Triton spreads requests across the instances.

    all        every GPU the server sees
    N          the first N GPUs (0 .. N-1)
    0,2        these GPUs; `device=2` names a single one (a bare `2` is a count, as in Docker)
"""
from __future__ import annotations

from models.errors import ToolkitError

from .pbtxt import Enum

ALL = "all"
MAX_GPUS = 64  # more than any single host holds


class GpuSelectionError(ToolkitError, ValueError):
    """A --gpus value that is malformed, or names a GPU the machine does not have."""


def parse_gpus(text: str) -> str | tuple[int, ...]:
    """ALL, or the GPU ids, from `all`, `N`, `0,2` or `device=LIST`."""
    value = text.strip()
    if value == ALL:
        return ALL
    listed = value.removeprefix("device=")
    if value == "0":
        raise GpuSelectionError("--gpus 0 is a count of no GPUs (a bare number is a count, as in Docker); for GPU 0 "
                                "alone write device=0")
    try:
        if listed == value and "," not in value:
            count = int(value)
            if not 1 <= count <= MAX_GPUS:
                raise ValueError
            return tuple(range(count))
        ids = tuple(int(part) for part in listed.split(","))
    except ValueError:
        raise GpuSelectionError(f"--gpus takes all, a count from 1 to {MAX_GPUS}, or GPU ids such as 0,2 or device=1; "
                                f"got {text!r}") from None
    if any(not 0 <= gpu < MAX_GPUS for gpu in ids) or len(set(ids)) != len(ids):
        raise GpuSelectionError(f"--gpus lists each GPU once, by ids from 0 to {MAX_GPUS - 1}; got {text!r}")
    return ids


def resolve_gpus(selection: str | tuple[int, ...], available: int, source: str = "--gpus",
                 fix: str = "drop --gpus to serve on the CPU") -> tuple[int, ...]:
    """The GPU ids on a machine with `available` GPUs; refused (one sentence) when one is missing.
    `source` names where the selection came from, `fix` what to do when there is no GPU."""
    if available < 1:
        raise GpuSelectionError(f"{source} needs a GPU, and this machine has none that PyTorch can see; {fix}")
    ids = tuple(range(available)) if selection == ALL else selection
    missing = [gpu for gpu in ids if gpu >= available]
    if missing:
        raise GpuSelectionError(f"{source} names GPU {missing[0]}, but this machine has {available} "
                                f"(ids 0 to {available - 1})")
    return ids


def placed_gpus(config_text: str) -> str | tuple[int, ...] | None:
    """Where a `generate` config.pbtxt places its instances: None on the CPU, else ALL or the ids."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    gpu_groups = [group for group in config.instance_group
                  if group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU]
    if not gpu_groups:
        return None
    ids = sorted({gpu for group in gpu_groups for gpu in group.gpus})
    return tuple(ids) if all(group.gpus for group in gpu_groups) else ALL


def instance_group(selection: str | tuple[int, ...] | None, count: int) -> dict:
    """`generate`'s instance group: on the CPU (one decode process on the server's default device)
    without a selection, else `count` instances on each selected GPU."""
    if selection is None:
        return {"count": count, "kind": Enum("KIND_CPU")}
    group = {"count": count, "kind": Enum("KIND_GPU")}
    if selection != ALL:
        group["gpus"] = list(selection)
    return group
