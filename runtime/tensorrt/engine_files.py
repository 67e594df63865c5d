"""Engine artefacts: the JSON sidecar beside each engine, and the content-addressed engine cache."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.errors import ToolkitError
from models.files import atomic_path, sha256_file

SIDECAR_FORMAT = "rotary-deploy-engine/1"


class EngineFileError(ToolkitError):
    """A missing or unreadable engine or sidecar."""


@dataclass
class BuildOptions:
    """Every flag that changes the engine; part of the cache key."""

    precision: str = "strongly-typed"  # or fp16 / bf16 (weak typing, TensorRT <= 10 only)
    workspace_mib: int | None = None
    opt_level: int = 3
    version_compatible: bool = False
    hardware_compatibility: str = "none"  # none | ampere+ | same-cc
    compute_capabilities: list[str] = field(default_factory=list)  # TensorRT-RTX targets; empty: its default set


@dataclass
class Sidecar:
    """What was built, from what, for which GPU and library."""

    profiles: list[dict]
    options: dict
    flavour: str
    library_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    onnx_sha256: str
    build_seconds: float
    io: list[dict] = field(default_factory=list)
    graph_metadata: dict = field(default_factory=dict)  # the ONNX metadata_props (config, weights, precision)
    format: str = SIDECAR_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Sidecar":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"unknown sidecar format {data.get('format')!r}")
        sidecar = cls(**data)
        kinds = {"profiles": list, "options": dict, "flavour": str, "library_version": str, "gpu_name": str,
                 "compute_capability": str, "graph_metadata": dict}
        wrong = next((name for name, kind in kinds.items() if not isinstance(getattr(sidecar, name), kind)), None)
        if wrong:
            raise ValueError(f"{wrong} must be a {kinds[wrong].__name__}")
        _check_profiles(sidecar.profiles)
        return sidecar


def _check_profiles(profiles: list) -> None:
    """Each profile maps input names to min/opt/max shapes of one rank (what Profile.to_dict writes)."""
    for index, profile in enumerate(profiles):
        if not isinstance(profile, dict):
            raise ValueError(f"profile {index} must be an object of input shapes")
        for name, shapes in profile.items():
            ok = isinstance(shapes, dict) and all(
                isinstance(shapes.get(which), list) and all(type(d) is int and d >= 0 for d in shapes[which])
                for which in ("min", "opt", "max"))
            if not ok or len({len(shapes[which]) for which in ("min", "opt", "max")}) != 1:
                raise ValueError(f"profile {index} input {name!r} needs min, opt and max lists of sizes of one rank")


def sidecar_path(engine: str | Path) -> Path:
    return Path(str(engine) + ".json")


def write_sidecar(engine: str | Path, sidecar: Sidecar) -> None:
    with atomic_path(sidecar_path(engine)) as temporary:
        temporary.write_text(sidecar.to_json())


def read_sidecar(engine: str | Path) -> Sidecar:
    path = sidecar_path(engine)
    if not path.is_file():
        raise EngineFileError(f"engine sidecar {path} is missing; rebuild the engine with build-engine")
    try:
        return Sidecar.from_json(path.read_text())
    except (ValueError, TypeError, OSError) as error:
        raise EngineFileError(f"engine sidecar {path} is unreadable ({error}); rebuild the engine with build-engine") from None


def onnx_sha256(onnx_path: str | Path) -> str:
    """sha256 of the graph file, plus its external data file if it has one."""
    digest = sha256_file(onnx_path)
    data = Path(str(onnx_path) + ".data")
    return hashlib.sha256((digest + sha256_file(data)).encode()).hexdigest() if data.exists() else digest


def cache_key(onnx_digest: str, profiles: list[dict], options: BuildOptions, flavour: str, library_version: str,
              gpu_name: str, compute_capability: str) -> str:
    """Same ONNX bytes, flags, profiles, library and GPU -> same key."""
    material = json.dumps({
        "onnx": onnx_digest, "profiles": profiles, "options": asdict(options), "flavour": flavour,
        "library": library_version, "gpu": gpu_name, "cc": compute_capability,
    }, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    root = os.environ.get("ROTARY_DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rotary-deploy")
    return Path(root) / "engines"


class EngineCache:
    """Engines stored by cache key, each with its sidecar."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.engine"

    def fetch(self, key: str, destination: Path) -> Sidecar | None:
        """Copy a cached engine and sidecar to `destination`; None on a miss."""
        cached = self._path(key)
        if not (cached.is_file() and sidecar_path(cached).is_file()):
            return None
        sidecar = read_sidecar(cached)
        if cached.resolve() != destination.resolve():
            with atomic_path(destination) as temporary:
                shutil.copyfile(cached, temporary)
            write_sidecar(destination, sidecar)
        return sidecar

    def store(self, key: str, engine: Path, sidecar: Sidecar) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(key)) as temporary:
            shutil.copyfile(engine, temporary)
        write_sidecar(self._path(key), sidecar)
