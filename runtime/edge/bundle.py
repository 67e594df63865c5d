"""The folder `package-edge` writes for one board and JetPack: the graph checked for that JetPack's
TensorRT, a memory budget with the profiles and workspace sized to fit, build.sh (build-engine,
or trtexec where the toolkit is not installed), the equivalent trtexec line, the parity commands,
a README and manifest.json (every other file's sha256). Written into a staging folder and renamed
into place at the end, so a failure leaves nothing behind."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from models.files import new_dir_mode, sha256_file
from models.graph_metadata import STATIC_KINDS, TOOLKIT_VERSION, GraphMetadata

from ..tensorrt.profiles import Profile, format_shapes
from .budget import MemoryBudget
from .checks import GraphCheck
from .readme import bundle_readme
from .targets import EdgeError, EdgeTarget, JetPack

MANIFEST_FORMAT = "rotary-deploy-edge/1"
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class EdgePlan:
    """Everything a bundle says, decided before a file is written."""

    model: Path
    metadata: GraphMetadata
    target: EdgeTarget
    jetpack: JetPack
    check: GraphCheck
    budget: MemoryBudget
    profile: Profile
    graph_files: tuple[Path, ...]  # the .onnx last, its external data first

    @property
    def engine(self) -> str:
        return self.model.with_suffix(".engine").name

    def build_engine_args(self) -> list[str]:
        axes = self.budget.axes
        spans = [("--batch", axes.spec("batch")), ("--seq", axes.spec("sequence")), ("--past", axes.spec("past"))]
        return ["build-engine", self.model.name, "--output", self.engine, "--flavor", "tensorrt",
                *[part for flag, spec in spans if spec for part in (flag, spec)],
                "--workspace", str(self.budget.workspace_mib), "--timing-cache", TIMING_CACHE, "--json", "build.json"]

    def trtexec_args(self) -> list[str]:
        shapes = {which: {name: span[i] for name, span in self.profile.shapes.items()}
                  for i, which in enumerate(("min", "opt", "max"))}
        return ["trtexec", f"--onnx={self.model.name}", f"--saveEngine={self.engine}", "--stronglyTyped",
                *(f"--{which}Shapes={format_shapes(shapes[which])}" for which in ("min", "opt", "max")),
                f"--memPoolSize=workspace:{self.budget.workspace_mib}", f"--timingCacheFile={TIMING_CACHE}",
                "--builderOptimizationLevel=3", "--skipInference"]

    def parity_commands(self) -> list[str]:
        """check-parity on the engine, within the profile; a quantized graph also against float."""
        from runtime.verify import DECODE_STEPS, GENERATE_PROMPT

        axes = self.budget.axes
        batch, seq = axes.batch[2], axes.sequence[2]
        lengths, generated = {1, min(17, seq), axes.sequence[1]}, 32
        if self.metadata.kind in STATIC_KINDS:  # each prompt and the sweep's decode steps fit a row
            lengths = {max(1, min(length, self.metadata.capacity - DECODE_STEPS)) for length in lengths}
            generated = min(generated, self.metadata.capacity - GENERATE_PROMPT)
        args = ["check-parity", self.engine, "--backend", "tensorrt", "--batch", _listed({1, min(3, batch)}),
                "--seq", _listed(lengths)]
        if axes.past:
            args += ["--past", _listed({1, axes.past[2] // 2 + 1})]
        if batch >= 2 and generated >= 1:
            args += ["--generate", str(generated)]
        if self.metadata.weights.preset is None:
            args += ["--checkpoint", "CHECKPOINT"]  # the weights the graph was exported from
        commands = [shlex.join(args)]
        if self.metadata.quantization is not None:
            commands.append(shlex.join([*args, "--against", "float"]))
        return commands


def _listed(values: set[int]) -> str:
    return ",".join(map(str, sorted(values)))


# Python 3.10 on JetPack 6 has no hashlib.file_digest: hash in 1 MiB pieces (weights may be GBs).
_CHECK_FILES = """python3 - <<'PY'
import hashlib, json, sys
def sha256(name):
    digest = hashlib.sha256()
    with open(name, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()
bad = [name for name, digest in json.load(open("manifest.json"))["files"].items() if sha256(name) != digest]
sys.exit(f"files changed since packing: {bad}; copy the bundle again" if bad else 0)
PY"""


def build_script(plan: EdgePlan) -> str:
    """build.sh: check the files against the manifest, build with build-engine (or trtexec), say what is next."""
    trtexec = shlex.join(plan.trtexec_args()[1:])
    return f"""#!/usr/bin/env bash
# Build the TensorRT engine for {plan.target.module} on JetPack {plan.jetpack.version} (TensorRT {plan.jetpack.tensorrt},
# CUDA {plan.jetpack.cuda}). Run it on the board, in this folder's copy.
set -euo pipefail
cd "$(dirname "$0")"
{_CHECK_FILES}
if command -v build-engine >/dev/null 2>&1; then
  {shlex.join(plan.build_engine_args())}
else
  echo "build-engine (rotary-deploy) is not installed here; building with trtexec" \\
       "(no sidecar: check-parity cannot read that engine)" >&2
  "${{TRTEXEC:-/usr/src/tensorrt/bin/trtexec}}" {trtexec}
fi
echo "equivalent trtexec command: $(cat trtexec.txt)"
echo "check the engine against PyTorch:"
printf '  %s\\n' {" ".join(shlex.quote(command) for command in plan.parity_commands())}
"""


def manifest(plan: EdgePlan, files: dict[str, str]) -> dict:
    metadata, jetpack = plan.metadata, plan.jetpack
    return {
        "format": MANIFEST_FORMAT, "toolkit_version": TOOLKIT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "target": plan.target.to_dict(), "jetpack": jetpack.to_dict(), "tensorrt": jetpack.tensorrt,
        "cuda": jetpack.cuda, "l4t": jetpack.l4t, "compute_capability": plan.target.compute_capability,
        "graph": {"file": plan.model.name, "kind": metadata.kind, "precision": metadata.precision,
                  "opset": metadata.opset, "weights": metadata.weights.description,
                  "weights_sha256": metadata.weights.sha256,
                  "quantization": json.loads(metadata.quantization.to_json()) if metadata.quantization else None},
        "checks": plan.check.to_dict(), "typing": "strongly typed (precision from the graph)",
        "profiles": [plan.profile.to_dict()], "workspace_mib": plan.budget.workspace_mib,
        "budget": plan.budget.to_dict(),
        "commands": {"build": "bash build.sh", "build_engine": shlex.join(plan.build_engine_args()),
                     "trtexec": shlex.join(plan.trtexec_args()), "parity": plan.parity_commands()},
        "files": files,
    }


def _write(folder: Path, plan: EdgePlan) -> None:
    for source in plan.graph_files:
        shutil.copyfile(source, folder / source.name)
    (folder / "trtexec.txt").write_text(shlex.join(plan.trtexec_args()) + "\n")
    (folder / "build.sh").write_text(build_script(plan))
    os.chmod(folder / "build.sh", 0o755)
    (folder / "README.md").write_text(bundle_readme(plan))
    files = {path.name: sha256_file(path) for path in sorted(folder.iterdir())}
    (folder / "manifest.json").write_text(json.dumps(manifest(plan, files), indent=2) + "\n")


def write_bundle(plan: EdgePlan, output: Path) -> Path:
    """Write the bundle into a staging folder beside `output`, then rename it to `output` (which must
    not exist, or be an empty folder)."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise EdgeError(f"{output} already exists; choose a new --output folder or remove it")
    if not output.parent.is_dir():
        raise EdgeError(f"cannot write {output}: {output.parent} is not a directory")
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        _write(staging, plan)
        os.chmod(staging, new_dir_mode())  # mkdtemp makes 0700
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
