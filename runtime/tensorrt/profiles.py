"""Optimisation profiles: min/opt/max shapes per input, derived from the graph's declared axes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.errors import ToolkitError
from models.signature import SUM_AXES

EMPTY_OK = {"past_sequence"}  # the prompt step runs with an empty cache

Shape = tuple[int, ...]


class ProfileError(ToolkitError):
    """A profile that is malformed or inconsistent."""


@dataclass(frozen=True)
class InputAxes:
    """One graph input: its name and, per dimension, an axis name or a fixed size."""

    name: str
    dims: tuple[str | int, ...]


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def check(self, label: str, smallest: int = 1) -> None:
        if self.min < smallest:
            raise ProfileError(f"{label}: sizes must be at least {smallest}, got min {self.min}")
        if not self.min <= self.opt <= self.max:
            raise ProfileError(f"{label}: need min <= opt <= max, got {self.min}:{self.opt}:{self.max}")


@dataclass(frozen=True)
class Profile:
    """min/opt/max shape of every input."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict:
        return {name: {"min": list(lo), "opt": list(op), "max": list(hi)} for name, (lo, op, hi) in self.shapes.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        return cls({name: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for name, v in data.items()})

    def contains(self, shapes: dict[str, Shape]) -> bool:
        for name, shape in shapes.items():
            if name not in self.shapes:
                return False
            lo, _, hi = self.shapes[name]
            if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
                return False
        return True

    def describe(self) -> str:
        return ", ".join(f"{name} {'x'.join(map(str, lo))} .. {'x'.join(map(str, hi))}"
                         for name, (lo, _, hi) in self.shapes.items())


def parse_range(text: str, label: str, smallest: int = 1) -> AxisRange:
    """'MIN:OPT:MAX' (or 'N' for a fixed size) -> AxisRange."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ProfileError(f"{label} {text!r}: expected MIN:OPT:MAX such as 1:4:8") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise ProfileError(f"{label} {text!r}: expected MIN:OPT:MAX such as 1:4:8")
    result = AxisRange(*values)
    result.check(f"{label} {text}", smallest)
    return result


def parse_shapes(text: str, flag: str) -> dict[str, Shape]:
    """trtexec style 'input_ids:1x128,attention_mask:1x128' -> {name: shape}."""
    shapes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            raise ProfileError(f"{flag} {item!r}: expected name:AxB such as input_ids:1x128") from None
    return shapes


def format_shapes(shapes: dict[str, Shape]) -> str:
    """{name: shape} -> trtexec style 'input_ids:1x128,attention_mask:1x128' (parse_shapes' inverse)."""
    return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in shapes.items())


def graph_axes(onnx_path: str | Path) -> tuple[list[InputAxes], dict[str, AxisRange], dict[str, str]]:
    """The graph's inputs, its declared axis ranges (export metadata; 1:1:1 where unknown)
    and its metadata_props. Only this toolkit's portable graphs are accepted."""
    import onnx

    from models.graph_metadata import STATIC_CACHE, GraphMetadata, GraphMetadataError

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ProfileError(f"cannot read ONNX file {onnx_path}: {detail}; export it again with export-model") from None
    metadata = {p.key: p.value for p in model.metadata_props}
    try:
        graph = GraphMetadata.from_props(metadata, str(onnx_path))
    except GraphMetadataError as error:
        raise ProfileError(str(error)) from None
    if graph.kind == STATIC_CACHE:  # the portable static graph (standard ops) is TensorRT's
        raise ProfileError(f"{onnx_path} is an ONNX Runtime static-cache graph (com.microsoft ops TensorRT cannot "
                           "parse); build an engine from a portable graph (export-model --static-cache N --portable, "
                           "or --with-past)")
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
        inputs.append(InputAxes(value.name, dims))
    declared = graph.signature().input_names
    if [spec.name for spec in inputs] != declared:
        raise ProfileError(f"{onnx_path}'s inputs {[spec.name for spec in inputs]} are not those its metadata declares "
                           f"({declared}); export it again with export-model")
    axes = {name: AxisRange(v["min"], v["opt"], v["max"]) for name, v in graph.axes.items()}
    for spec in inputs:
        for dim in spec.dims:
            if isinstance(dim, str) and dim not in axes:
                axes[dim] = AxisRange(1, 1, 1)
    return inputs, axes, metadata


def build_profiles(inputs: list[InputAxes], axes: dict[str, AxisRange], batch: list[str] | None = None,
                   seq: list[str] | None = None, past: list[str] | None = None, min_shapes: list[str] | None = None,
                   opt_shapes: list[str] | None = None, max_shapes: list[str] | None = None,
                   capacity: int | None = None) -> list[Profile]:
    """Profiles from the declared axes, overridden per profile by --batch/--seq ranges or by
    trtexec-style --min/--opt/--max-shapes. The i-th occurrence of a flag shapes profile i.
    `capacity`: tokens a row of the graph holds (GraphMetadata.capacity); no range may pass it."""
    batch, seq, past = batch or [], seq or [], past or []
    min_shapes, opt_shapes, max_shapes = min_shapes or [], opt_shapes or [], max_shapes or []
    if not (len(min_shapes) == len(opt_shapes) == len(max_shapes)):
        raise ProfileError("--min-shapes, --opt-shapes and --max-shapes must be given the same number of times")
    if past and not any("past_sequence" in spec.dims for spec in inputs):
        raise ProfileError("--past sets cached lengths, and this graph has no key/value cache inputs; drop --past, "
                           "or build from a graph exported --with-past")
    count = max(1, len(batch), len(seq), len(past), len(min_shapes))
    profiles = []
    for index in range(count):
        ranges = dict(axes)
        if batch:
            ranges["batch"] = parse_range(batch[min(index, len(batch) - 1)], "--batch")
        if seq:
            ranges["sequence"] = parse_range(seq[min(index, len(seq) - 1)], "--seq")
        if past:
            ranges["past_sequence"] = parse_range(past[min(index, len(past) - 1)], "--past", smallest=0)
        _check_window(ranges, capacity, index)
        for derived, parts in SUM_AXES.items():  # total_sequence = past_sequence + sequence
            if all(part in ranges for part in parts):
                ranges[derived] = AxisRange(*(sum(getattr(ranges[p], w) for p in parts) for w in ("min", "opt", "max")))
        shapes = {}
        for spec in inputs:
            shapes[spec.name] = tuple(
                tuple(d if isinstance(d, int) else getattr(ranges[d], which) for d in spec.dims)
                for which in ("min", "opt", "max")
            )
        if min_shapes:
            explicit = [parse_shapes(flags[index], name) for flags, name in
                        ((min_shapes, "--min-shapes"), (opt_shapes, "--opt-shapes"), (max_shapes, "--max-shapes"))]
            for name in explicit[0].keys() | explicit[1].keys() | explicit[2].keys():
                if name not in shapes:
                    raise ProfileError(f"profile {index}: the graph has no input {name!r}; inputs are {sorted(shapes)}")
                if not all(name in e for e in explicit):
                    raise ProfileError(f"profile {index}: give {name} in each of --min-shapes, --opt-shapes and --max-shapes")
                shapes[name] = (explicit[0][name], explicit[1][name], explicit[2][name])
        profile = Profile(shapes)
        validate_profile(profile, inputs, index)
        profiles.append(profile)
    return profiles


def _check_window(ranges: dict[str, AxisRange], capacity: int | None, index: int) -> None:
    for axis, flag in (("sequence", "--seq"), ("past_sequence", "--past")):
        if capacity and axis in ranges and ranges[axis].max > capacity:
            raise ProfileError(f"profile {index}: {flag} up to {ranges[axis].max} tokens is past the {capacity} tokens "
                               f"a row of this graph holds; keep {flag}'s maximum within {capacity}")


def validate_profile(profile: Profile, inputs: list[InputAxes], index: int = 0) -> None:
    """min <= opt <= max everywhere, fixed dims respected, inputs sharing an axis agree."""
    seen: dict[str, tuple[str, AxisRange]] = {}
    for spec in inputs:
        lo, op, hi = profile.shapes[spec.name]
        for shape in (lo, op, hi):
            if len(shape) != len(spec.dims):
                raise ProfileError(f"profile {index}: {spec.name} has {len(spec.dims)} dimensions, got shape {shape}")
        for axis, dim in enumerate(spec.dims):
            span = AxisRange(lo[axis], op[axis], hi[axis])
            span.check(f"profile {index}: {spec.name} dimension {axis}", 0 if dim in EMPTY_OK else 1)
            if isinstance(dim, int) and dim and (span.min, span.max) != (dim, dim):
                raise ProfileError(f"profile {index}: {spec.name} dimension {axis} is fixed at {dim} in the graph")
            if isinstance(dim, str):
                if dim in seen and seen[dim][1] != span:
                    raise ProfileError(
                        f"profile {index}: {spec.name} and {seen[dim][0]} share axis {dim!r} but their ranges differ"
                    )
                seen.setdefault(dim, (spec.name, span))
