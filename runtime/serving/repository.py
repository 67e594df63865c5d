"""Write a Triton model repository from what the toolkit produced.

    REPO/<name>/config.pbtxt     the model as Triton's own backends serve it: onnxruntime_onnx for a
    REPO/<name>/1/model.onnx     graph, tensorrt_plan (model.plan + its sidecar) for an engine
    REPO/generate/config.pbtxt   python backend, decoupled: one response per token, in-flight batching
    REPO/generate/1/model.py     runs the toolkit's decoder through runtime.serving

`generate` finds its decoder through its config parameters (a path relative to its own folder,
the device, the limits), so the repository can be moved or mounted anywhere as one folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from models.errors import ToolkitError
from models.graph_metadata import GraphMetadata, read_graph_metadata
from models.signature import TensorSpec

from ..decoding.open import read_model_metadata
from ..registry import ENGINE_SUFFIXES
from .gpus import instance_group
from .limits import Limits
from .pbtxt import Enum, parameters, render
from .requests import GENERATE, INPUTS, OUTPUTS

VERSION = "1"
TRITON_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                "bfloat16": "TYPE_BF16"}
DEVICES = ("auto", "cpu", "cuda")  # where generate's decoder runs; auto: CUDA when the server has it
ENTRY = Path(__file__).with_name("model_entry.py")  # becomes generate/1/model.py


class RepositoryError(ToolkitError):
    """A repository that cannot be written as asked."""


@dataclass(frozen=True)
class RepositoryOptions:
    name: str = "rotary"  # the model entry's name
    kind: str = "gpu"  # where Triton runs the model entry: gpu or cpu
    instances: int = 1  # per GPU (per profile for engines)
    max_batch_size: int | None = None  # None: the graph's batch axis, or the engine's profiles
    queue_delay_us: int = 100  # dynamic batching: how long to wait for more requests
    limits: Limits = field(default_factory=Limits)
    device: str = "auto"  # generate's decoder
    decoder: Path | None = None  # a different graph for generate (e.g. a static-cache graph beside an engine)
    python_env: Path | None = None  # conda-pack archive for the python backend (EXECUTION_ENV_PATH)
    generate_instances: int = 1  # generate instances (per GPU with `gpus`), sharing a decoder of limits.max_rows rows
    gpus: str | tuple[int, ...] | None = None  # runtime.serving.gpus: None (today's default device), ALL or GPU ids


def export_repository(model: str | Path, output: str | Path, options: RepositoryOptions) -> dict:
    """Read what `model` (a graph or an engine) and the optional decoder graph record, check that
    they belong together and that the limits fit, and write the repository."""
    model = Path(model)
    metadata = read_model_metadata(model)
    profiles = None
    if model.suffix in ENGINE_SUFFIXES:
        from ..tensorrt.engine_files import read_sidecar

        profiles = read_sidecar(model).profiles
    decoder = metadata
    if options.decoder is not None:
        decoder = read_graph_metadata(options.decoder)
        if decoder.weights.sha256 != metadata.weights.sha256:
            raise RepositoryError(f"--decoder {options.decoder} was exported from other weights than {model}; "
                                  "export both from the same checkpoint")
    capacity = decoder_capacity(decoder)
    options.limits.check_capacity(capacity, f"the decoder's {capacity}-token capacity")
    return write_repository(model, output, options, metadata, profiles, decoder)


def decoder_capacity(metadata: GraphMetadata) -> int | None:
    """Tokens one row can hold (prompt + generated): the static cache (of either static kind), or
    max_seq_len; None: unbounded."""
    return metadata.capacity


def write_repository(model: str | Path, output: str | Path, options: RepositoryOptions, metadata: GraphMetadata,
                     profiles: list[dict] | None = None, decoder_metadata: GraphMetadata | None = None) -> dict:
    """Write REPO at `output` (all or nothing); `metadata`: what `model` records about itself,
    `profiles`: an engine's optimization profiles. Returns a report of what was written."""
    model, output = Path(model), Path(output)
    _check(model, output, options)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        engine = model.suffix in ENGINE_SUFFIXES
        entry = staging / options.name / VERSION
        entry.mkdir(parents=True)
        filename = "model.plan" if engine else "model.onnx"
        _copy_model(model, entry / filename, engine)
        config = model_config(options, metadata, profiles if engine else None)
        (staging / options.name / "config.pbtxt").write_text(render(config))
        decoder_path = f"../{options.name}/{VERSION}/{filename}"
        if options.decoder is not None:
            decoder_path = f"{VERSION}/decoder.onnx"
            (staging / GENERATE / VERSION).mkdir(parents=True)
            _copy_model(options.decoder, staging / GENERATE / decoder_path, False)
        generate = generate_config(options, decoder_path, decoder_metadata or metadata)
        _write_generate(staging, generate, options)
        os.chmod(staging, 0o755)
        os.rename(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"repository": str(output), "models": {options.name: config["platform"], GENERATE: "python (decoupled)"},
            "max_batch_size": config["max_batch_size"], "decoder_model": decoder_path, "device": options.device,
            "limits": options.limits.to_parameters()}


def _check(model: Path, output: Path, options: RepositoryOptions) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise RepositoryError(f"{output} already exists; choose a new --output or remove it")
    if not output.parent.is_dir():
        raise RepositoryError(f"cannot write the repository {output}: {output.parent} is not a directory")
    if options.name == GENERATE or not options.name.replace("-", "_").isidentifier():
        raise RepositoryError(f"--name {options.name!r} must be a simple name (letters, digits, _ or -) other than "
                              f"{GENERATE!r}")
    if options.device not in DEVICES:
        raise RepositoryError(f"device {options.device!r} is not one of {', '.join(DEVICES)}")
    if model.suffix in ENGINE_SUFFIXES and options.kind != "gpu":
        raise RepositoryError("TensorRT engines run on GPUs only; drop --kind cpu")
    if options.gpus is not None and options.device == "cpu":
        raise RepositoryError("--gpus places generate on GPUs; drop --device cpu (or --gpus)")
    if output.exists():
        output.rmdir()  # empty: replaced by the finished repository


def _copy_model(source: Path, destination: Path, engine: bool) -> None:
    """The model file and what belongs to it: external data, or an engine's sidecar."""
    shutil.copyfile(source, destination)
    companion = Path(str(source) + (".json" if engine else ".data"))
    if companion.is_file():
        shutil.copyfile(companion, Path(str(destination) + companion.suffix))
    if not engine:
        _point_external_data(destination, companion)


def _point_external_data(destination: Path, data: Path) -> None:
    """A graph's external data is found by the file name recorded in the graph; keep that name valid."""
    if not data.is_file():
        return
    import onnx

    proto = onnx.load(str(destination), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = Path(str(destination) + ".data").name
    onnx.save(proto, str(destination))


def _write_generate(staging: Path, config: dict, options: RepositoryOptions) -> None:
    folder = staging / GENERATE
    (folder / VERSION).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ENTRY, folder / VERSION / "model.py")
    if options.python_env is not None:
        shutil.copyfile(options.python_env, folder / "python-env.tar.gz")
    (folder / "config.pbtxt").write_text(render(config))


def model_config(options: RepositoryOptions, metadata: GraphMetadata, profiles: list[dict] | None) -> dict:
    """The model entry: platform, signature, batching, instances (one group per engine profile)."""
    signature = metadata.signature()
    tensors = (*signature.inputs, *signature.outputs)
    batched = all(spec.dims[:1] == ("batch",) for spec in tensors)
    max_batch = options.max_batch_size if batched else 0
    if max_batch is None:
        max_batch = _profile_batch(profiles) if profiles else signature.axes["batch"].max
    config = {"name": options.name, "platform": "tensorrt_plan" if profiles is not None else "onnxruntime_onnx",
              "max_batch_size": max_batch,
              "input": [_tensor(spec, max_batch > 0) for spec in signature.inputs],
              "output": [_tensor(spec, max_batch > 0) for spec in signature.outputs]}
    if max_batch > 0:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": options.queue_delay_us}
    kind = Enum("KIND_GPU" if options.kind == "gpu" else "KIND_CPU")
    placed = {"gpus": list(options.gpus)} if options.kind == "gpu" and isinstance(options.gpus, tuple) else {}
    if profiles is not None:  # one instance group per optimization profile; CUDA graphs per shape
        config["instance_group"] = [{"count": options.instances, "kind": kind, **placed, "profile": [str(index)]}
                                    for index in range(len(profiles))]
        config["optimization"] = {"cuda": {"graphs": True}}
    else:
        config["instance_group"] = [{"count": options.instances, "kind": kind, **placed}]
    return config


def _profile_batch(profiles: list[dict]) -> int:
    """The largest batch every profile accepts (0 when one does not start at batch 1)."""
    batches = [shapes["input_ids"] for shapes in profiles if "input_ids" in shapes]
    if not batches or any(shape["min"][0] != 1 for shape in batches):
        return 0
    return min(shape["max"][0] for shape in batches)


def _tensor(spec: TensorSpec, batched: bool) -> dict:
    dims = [d if isinstance(d, int) else -1 for d in (spec.dims[1:] if batched else spec.dims)]
    tensor = {"name": spec.name, "data_type": Enum(TRITON_TYPES[spec.dtype]), "dims": dims or [1]}
    if not dims:  # a scalar travels as [1] and is reshaped for the graph
        tensor["reshape"] = {"shape": []}
    return tensor


def generate_config(options: RepositoryOptions, decoder_path: str, metadata: GraphMetadata) -> dict:
    """The decoupled python model: optional inputs (prompt or prompt_ids is checked per request)."""
    values = {"decoder_model": decoder_path, "device": options.device, "vocab_size": metadata.config.num_tokens,
              **options.limits.to_parameters()}
    if decoder_capacity(metadata) is not None:
        values["capacity"] = decoder_capacity(metadata)  # for clients: prompt + new tokens must fit
    if options.python_env is not None:
        values["EXECUTION_ENV_PATH"] = "$$TRITON_MODEL_DIRECTORY/python-env.tar.gz"
    return {"name": GENERATE, "backend": "python", "max_batch_size": 0,
            "model_transaction_policy": {"decoupled": True},
            "input": [{"name": name, "data_type": Enum(dtype), "dims": dims, "optional": True}
                      for name, (dtype, dims, _) in INPUTS.items()],
            "output": [{"name": name, "data_type": Enum(dtype), "dims": dims}
                       for name, (dtype, dims, _) in OUTPUTS.items()],
            "instance_group": [instance_group(options.gpus, options.generate_instances)],
            "parameters": parameters(values)}
