"""What `serve` does: get a repository (an exported one, or one written now for a graph or an
engine), start the bundled tritonserver on it, load `generate`, serve until told to stop, stop cleanly."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from models.errors import ToolkitError
from models.progress import phase

from ..registry import ENGINE_SUFFIXES
from .limits import Limits
from .signal_flag import SignalFlag
from .repository import GENERATE, RepositoryOptions, export_repository
from .tritonserver import HELD_NOTE, Endpoints, ServerError, TritonServer


def repository_for(model: str, workdir: Path, limits: dict, device: str | None, log: Callable[[str], None],
                   instances: int | None = None, gpus: tuple[int, ...] | None = None) -> tuple[Path, dict | None]:
    """(repository, generate config override or None). `model`: an exported repository (whose limits,
    device, generate instances and GPUs the given ones override), a graph or an engine (a repository
    is written for it in `workdir`). `device` None: auto, or the repository's."""
    if Path(model).is_dir():
        if not (Path(model) / GENERATE / "config.pbtxt").is_file():
            raise ServerError(f"{model} is not a repository written by export-triton (no {GENERATE}/config.pbtxt)")
        return Path(model), generate_override(Path(model), limits, device, instances, gpus)
    base = Limits().replace(**limits)
    if not Path(model).is_file():
        raise ServerError(f"model not found: {model}; pass a repository, an .onnx graph or an engine")
    from ..decoding.open import read_model_metadata
    from .repository import decoder_capacity

    capacity = decoder_capacity(read_model_metadata(Path(model)))  # the limits not given fit what a row holds
    fitted = base.fitted(capacity, set(limits))
    if fitted != base:
        log(f"serve: the decoder holds {capacity} tokens per row: --max-prompt-tokens {fitted.max_prompt_tokens}, "
            f"--max-new-tokens-limit {fitted.max_new_tokens}")
    base = fitted
    kind = "gpu" if Path(model).suffix in ENGINE_SUFFIXES else "cpu"
    options = RepositoryOptions(kind=kind, limits=base, device=device or "auto", generate_instances=instances or 1,
                                gpus=gpus)
    return Path(export_repository(model, workdir / "repository", options)["repository"]), None


def generate_override(repository: Path, limits: dict, device: str | None, instances: int | None = None,
                      gpus: tuple[int, ...] | None = None) -> dict | None:
    """An exported repository's `generate` config with the given limits (and device) in its parameters,
    `instances` instances (on each of `gpus`), as the JSON Triton's load API takes; None when nothing changes."""
    if not limits and device is None and instances is None and gpus is None:
        return None
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repository / GENERATE / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    current = {key: value.string_value for key, value in config.parameters.items()}
    merged = Limits.from_parameters(current).replace(**limits).to_parameters()
    if device is not None:
        merged["device"] = device
    for key, value in merged.items():
        config.parameters[key].string_value = value
    if instances is not None:
        config.instance_group[0].count = instances
    if gpus is not None:
        group = config.instance_group[0]
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_GPU
        group.gpus[:] = list(gpus)
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def run_server(repository: Path, endpoints: Endpoints, workdir: Path, override: dict | None, stop: SignalFlag,
               on_ready: Callable[[], None], exit_timeout: int, start_timeout: float, log_path: Path | None,
               before_stop: Callable[[bool], None] = lambda graceful: None,
               log: Callable[[str], None] = lambda message: None) -> int:
    """Serve until `stop` is set (or the server or one of its model processes dies); returns
    tritonserver's exit code. `before_stop(graceful)` runs first at shutdown (the OpenAI front end
    stops accepting); after a failure nothing waits for a drain that cannot come."""
    server = TritonServer(repository, endpoints, workdir, exit_timeout, log_path)
    graceful = False
    try:
        with phase(log, "starting tritonserver", start="serve: starting tritonserver ..."):
            server.wait_live(min(start_timeout, 60.0))
        with phase(log, "loading generate", start="serve: loading generate (its decode process opens the decoder and "
                                                  "warms it up; CUDA graphs are captured on a GPU) ..."):
            server.load(GENERATE, override, start_timeout)
        processes = server.model_processes()
        on_ready()
        while not stop.wait(0.2):
            server.check_running()
            server.check_model_processes(processes)
        graceful = True
    finally:
        before_stop(graceful)
        code = server.stop(graceful)
    return stop_outcome(server, code, log)


def stop_outcome(server: TritonServer, code: int | None, log: Callable[[str], None]) -> int:
    """tritonserver's exit code after a stop, as serve's: 0, or 1 when the only thing wrong was a
    model tritonserver itself held with nothing in flight (noted); anything else raises."""
    for model in server.held:
        log(f"serve: note: {HELD_NOTE.format(model=model)}")
    if code == 1 and server.held and not server.stop_problem:
        return 0  # Triton's exit code for a model still loaded at its exit timeout: the held one
    if code != 0:
        why = f"; {server.stop_problem}" if server.stop_problem else ""
        raise ToolkitError(f"tritonserver did not stop cleanly (exit code {code}{why}); see {server.log_path}")
    return code
