"""Which TensorRT is installed: the full `tensorrt` (10.x / 11.x) or `tensorrt_rtx`.

Both expose the same Python API for what this toolkit uses, so one code path drives
either; this module only finds and imports the right one.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from models.errors import ToolkitError

# Module names per flavour, tried in order: the tensorrt-rtx-cu13 package provides
# `tensorrt_rtx`, a shim over the `tensorrt_rtx_bindings` module of the bindings wheel.
FLAVOURS = {"tensorrt": ("tensorrt",), "tensorrt-rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
INSTALL_HINT = (
    "install TensorRT-RTX (pip install tensorrt-rtx-cu13) for RTX and Ampere-or-newer GPUs, or the full "
    "TensorRT builder (pip install tensorrt-cu13 from NVIDIA's package index; on Jetson it comes with JetPack)"
)


class TensorRTUnavailable(ToolkitError):
    """No usable TensorRT library."""


@dataclass(frozen=True)
class TensorRTLibrary:
    module: ModuleType
    flavour: str  # "tensorrt" or "tensorrt-rtx"
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    @property
    def supports_weak_typing(self) -> bool:
        """TensorRT <= 10 still has the FP16/BF16 builder flags; TensorRT 11 and RTX are strongly typed."""
        return not self.is_rtx and self.major <= 10 and hasattr(self.module.BuilderFlag, "FP16")


def _import(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ImportError:
        return None
    except Exception as error:  # e.g. a stub package, or CUDA libraries missing
        raise TensorRTUnavailable(f"{module_name} is installed but cannot be imported ({error}); {INSTALL_HINT}") from None


def load_tensorrt(flavour: str = "auto") -> TensorRTLibrary:
    """Import the requested flavour; `auto` prefers the full TensorRT, then TensorRT-RTX."""
    if flavour not in ("auto", *FLAVOURS):
        raise TensorRTUnavailable(f"unknown TensorRT flavour {flavour!r}; choose auto, tensorrt or tensorrt-rtx")
    candidates = list(FLAVOURS) if flavour == "auto" else [flavour]
    for name in candidates:
        for module_name in FLAVOURS[name]:
            module = _import(module_name)
            if module is not None and hasattr(module, "Builder"):
                return TensorRTLibrary(module, name, str(getattr(module, "__version__", "0")))
    wanted = "no TensorRT library is installed" if flavour == "auto" else f"{FLAVOURS[flavour][0]} is not installed"
    raise TensorRTUnavailable(f"{wanted}; {INSTALL_HINT}")
