"""TensorRT backend: runs a serialized engine (tensorrt or tensorrt_rtx) with torch CUDA buffers.

Engines are untrusted input: an engine is deserialized only after its sidecar matches the
installed library and GPU, and version-compatible plans (which embed host code) are loaded
only with `allow_host_code=True`.
"""
from __future__ import annotations

import threading
from pathlib import Path

from models.graph_metadata import GraphMetadata, GraphMetadataError
from models.precision import PRECISIONS
from runtime.tensorrt.compat import EngineIncompatible, check_engine_runs_here
from runtime.tensorrt.engine_files import read_sidecar
from runtime.tensorrt.library import load_tensorrt
from runtime.tensorrt.profiles import Profile

from .base import Backend, BackendError, TensorMeta

_TRT_TO_TORCH = {**{row.tensorrt_type: row.dtype for row in PRECISIONS.values()},
                 "INT64": "int64", "INT32": "int32", "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}


class TensorRTBackend(Backend):
    """Loads an engine and its sidecar; one execution context (and CUDA stream) per thread."""

    def __init__(self, engine_path: str | Path, flavour: str = "auto", allow_host_code: bool = False,
                 cuda_graphs: bool = False):
        import torch

        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise BackendError(f"engine not found: {engine_path}")
        self.sidecar = read_sidecar(engine_path)
        self.library = load_tensorrt(self.sidecar.flavour if flavour == "auto" else flavour)
        if not torch.cuda.is_available():
            raise BackendError("no CUDA GPU is visible; TensorRT engines run on the GPU")
        major, minor = torch.cuda.get_device_capability(0)
        check_engine_runs_here(self.sidecar, self.library.flavour, self.library.version,
                               torch.cuda.get_device_name(0), f"{major}.{minor}")
        trt = self.library.module
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if self.sidecar.options.get("version_compatible"):
            if not allow_host_code:
                raise EngineIncompatible(
                    f"{engine_path} is a version-compatible plan that embeds host code; load it only if you trust "
                    "it, with TensorRTBackend(..., allow_host_code=True)"
                )
            self._runtime.engine_host_code_allowed = True
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise BackendError(f"{self.library.flavour} could not deserialize {engine_path}; rebuild it with build-engine")
        self.name = self.library.flavour
        self.device = "cuda"
        self.profiles = [Profile.from_dict(p) for p in self.sidecar.profiles]
        self._inputs, self._outputs = [], []
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            dtype = _TRT_TO_TORCH.get(self.engine.get_tensor_dtype(name).name, "float32")
            meta = TensorMeta(name, dtype, tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(name)))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(meta)
        try:
            graph = GraphMetadata.from_props(self.sidecar.graph_metadata, f"the graph behind {engine_path}")
        except GraphMetadataError as error:
            raise BackendError(str(error)) from None
        self.adopt_graph(graph, str(engine_path))
        self._local = threading.local()
        self.cuda_graphs = cuda_graphs

    @property
    def inputs(self) -> list[TensorMeta]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorMeta]:
        return self._outputs

    def _context(self):
        import torch

        local = self._local
        if getattr(local, "context", None) is None:
            local.context = self.engine.create_execution_context()
            local.stream = torch.cuda.Stream()
            local.profile = None
            local.graphs = {}  # input shapes -> (CUDAGraph, static inputs, static outputs)
        return local

    def select_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for index, profile in enumerate(self.profiles):
            if profile.contains(shapes):
                return index
        allowed = "; ".join(f"profile {i}: {p.describe()}" for i, p in enumerate(self.profiles))
        given = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())
        raise BackendError(f"input shapes ({given}) are outside every profile of the engine ({allowed}); "
                           "rebuild with larger --batch/--seq ranges")

    def _run_torch(self, feeds: dict) -> dict:
        """Torch CUDA tensors in and out (no host copies). With cuda_graphs=True each new set of
        input shapes is captured once and later calls with those shapes replay the graph."""
        feeds = {name: tensor.to("cuda") for name, tensor in feeds.items()}
        if self.cuda_graphs:
            return self._run_graph(feeds)
        return self._execute(feeds)

    def _run_graph(self, feeds: dict) -> dict:
        import torch

        local = self._context()
        key = tuple((name, tuple(t.shape)) for name, t in sorted(feeds.items()))
        if key not in local.graphs:
            static_inputs = {name: t.clone() for name, t in feeds.items()}
            self._execute(static_inputs)  # warm up: profile and shapes set, lazy allocations done
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=local.stream):
                static_outputs = self._execute(static_inputs, synchronize=False)
            local.graphs[key] = (graph, static_inputs, static_outputs)
        graph, static_inputs, static_outputs = local.graphs[key]
        for name, tensor in feeds.items():
            static_inputs[name].copy_(tensor)
        graph.replay()
        torch.cuda.current_stream().wait_stream(local.stream)
        return {name: t.clone() for name, t in static_outputs.items()}

    def _execute(self, feeds: dict, synchronize: bool = True) -> dict:
        import torch

        local = self._context()
        context, stream = local.context, local.stream
        profile = self.select_profile({name: tuple(t.shape) for name, t in feeds.items()})
        if local.profile != profile:
            context.set_optimization_profile_async(profile, stream.cuda_stream)
            local.profile = profile
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for meta in self._outputs:
            shape = tuple(context.get_tensor_shape(meta.name))
            outputs[meta.name] = torch.empty(shape, dtype=getattr(torch, meta.dtype), device="cuda")
            context.set_tensor_address(meta.name, outputs[meta.name].data_ptr())
        if synchronize:
            stream.wait_stream(torch.cuda.current_stream())
        if not context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"{self.name}: execution failed; see the TensorRT log above")
        if synchronize:
            stream.synchronize()
        return outputs

    def close(self) -> None:
        super().close()
        self._local = threading.local()
        self.engine = None


def open_tensorrt(path, spec, cuda_graphs: bool = False, **_options) -> TensorRTBackend:
    """The registry's opener; the precision is the engine's own."""
    return TensorRTBackend(path, cuda_graphs=cuda_graphs)
