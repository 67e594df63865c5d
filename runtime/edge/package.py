"""`package_edge`: from an exported graph to a bundle for one board and JetPack, every check done
before the first file is written."""
from __future__ import annotations

from pathlib import Path

from export.onnx_export import initializer_bytes
from models.graph_metadata import GraphMetadata, read_graph_metadata
from models.precision import precision

from ..tensorrt.profiles import build_profiles, graph_axes, parse_range
from .budget import Axes, fit_budget
from .bundle import EdgePlan, write_bundle
from .checks import check_for_jetpack
from .targets import EdgeError, edge_target, jetpack as lookup_jetpack

AXIS_FLAGS = {"batch": "--batch", "sequence": "--seq", "past_sequence": "--past"}


def requested_axes(metadata: GraphMetadata, flags: dict[str, str | None]) -> tuple[Axes, set[str]]:
    """The largest profile from `flags` (axis -> MIN:OPT:MAX or None), else the graph's declared
    axes; and the axes given (which are never shrunk)."""
    if flags.get("past_sequence") is not None and not metadata.with_past:
        raise EdgeError("--past applies to graphs with a key/value cache (export-model --with-past)")
    spans = {name: (v["min"], v["opt"], v["max"]) for name, v in metadata.axes.items()}
    for name, text in flags.items():
        if text is not None:
            span = parse_range(text, AXIS_FLAGS[name], 0 if name == "past_sequence" else 1)
            spans[name] = (span.min, span.opt, span.max)
    axes = Axes(spans["batch"], spans["sequence"], spans.get("past_sequence") if metadata.with_past else None)
    return axes, {name.removesuffix("_sequence") for name, text in flags.items() if text is not None}


def graph_files(model: Path, proto) -> tuple[Path, ...]:
    """The graph and the external data files it names."""
    locations = {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    return (*sorted(model.parent / name for name in locations), model)


def plan_bundle(model: str | Path, target: str, jetpack: str, flags: dict[str, str | None] | None = None,
                workspace_mib: int | None = None, usable_gib: float | None = None) -> EdgePlan:
    """Check the graph for the JetPack's TensorRT, size the profile and workspace to the board."""
    import onnx

    model, board, release = Path(model), edge_target(target), lookup_jetpack(jetpack)
    metadata = read_graph_metadata(model)
    proto = onnx.load(str(model), load_external_data=False)
    check = check_for_jetpack(proto, metadata, release)
    if check.errors:
        more = f" (and {len(check.errors) - 1} more)" if len(check.errors) > 1 else ""
        raise EdgeError(f"TensorRT {release.tensorrt} (JetPack {release.version}) cannot build {model.name}: "
                        f"{check.errors[0]}{more}")
    axes, fixed = requested_axes(metadata, flags or {})
    usable = usable_gib or board.usable_gib
    budget = fit_budget(metadata.config, precision(metadata.precision), initializer_bytes(proto), axes, usable,
                        workspace_mib, fixed, f"{board.name} ({board.module}, {usable:.1f} GiB usable)")
    inputs, ranges, _ = graph_axes(model)
    spans = budget.axes
    profile = build_profiles(inputs, ranges, [spans.spec("batch")], [spans.spec("sequence")],
                             [spans.spec("past")] if spans.past else None, capacity=metadata.capacity)[0]
    return EdgePlan(model, metadata, board, release, check, budget, profile, graph_files(model, proto))


def package_edge(model: str | Path, target: str, jetpack: str, output: str | Path,
                 flags: dict[str, str | None] | None = None, workspace_mib: int | None = None,
                 usable_gib: float | None = None) -> EdgePlan:
    """Write the bundle for `model` on `target` with `jetpack` into the folder `output`."""
    plan = plan_bundle(model, target, jetpack, flags, workspace_mib, usable_gib)
    write_bundle(plan, Path(output))
    return plan
