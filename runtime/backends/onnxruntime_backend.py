"""ONNX Runtime backend; the execution provider is chosen by name."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.graph_metadata import GraphMetadata, GraphMetadataError
from models.precision import PRECISIONS

from .base import Backend, BackendError, TensorMeta

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ORT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(float)": "float32",
              **{f"tensor({row.dtype})": row.dtype for row in PRECISIONS.values()}}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def open_session(model: str | Path | bytes, provider: str, cuda_options: dict[str, str] | None = None,
                 threads: int | None = None):
    """An InferenceSession on `provider` ("cpu" or "cuda") for a path or serialized bytes, with
    one clear error for a missing provider, a missing file or a file ONNX Runtime rejects.
    On CUDA, TF32 is off unless `cuda_options` says otherwise (it moves fp32 results in the
    4th digit)."""
    ort = _import_onnxruntime()
    if provider not in PROVIDERS:
        raise BackendError(f"unknown ONNX Runtime provider {provider!r}; choose one of {sorted(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise BackendError(
            f"this ONNX Runtime build has no {PROVIDERS[provider]} (it has {ort.get_available_providers()}); "
            "install onnxruntime-gpu for CUDA"
        )
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise BackendError(f"ONNX model not found: {model}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ONNX Runtime fuses a weight DequantizeLinear -> MatMul into MatMulNBits and, by default,
    # quantizes its activations to int8 (accuracy level 4): the graph says float activations.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = threads
    provider_options = {"device_id": "0", "use_tf32": "0", **(cuda_options or {})} if provider == "cuda" else {}
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                    providers=[(PROVIDERS[provider], provider_options)])
    except Exception as error:  # ORT raises its own exception types for bad files
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        where = "the serialized graph" if isinstance(model, bytes) else model
        raise BackendError(f"ONNX Runtime cannot load {where}: {first}") from None


def session_io(session) -> tuple[list[TensorMeta], list[TensorMeta]]:
    """(inputs, outputs) of a loaded session as TensorMeta."""
    def meta(arg) -> TensorMeta:
        return TensorMeta(arg.name, _ORT_TYPES.get(arg.type, arg.type), tuple(arg.shape))

    return [meta(a) for a in session.get_inputs()], [meta(a) for a in session.get_outputs()]


def session_metadata(session, where: str) -> GraphMetadata:
    """The toolkit metadata of a loaded graph, as a BackendError when it is missing or damaged."""
    try:
        return GraphMetadata.from_props(dict(session.get_modelmeta().custom_metadata_map), where)
    except GraphMetadataError as error:
        raise BackendError(str(error)) from None


def binding_type(torch_dtype):
    """The element type IO binding takes for a torch dtype: numpy's, or ONNX's number for
    bfloat16, which numpy lacks (ONNX Runtime reads the raw buffer either way)."""
    import torch

    if torch_dtype == torch.bfloat16:
        return PRECISIONS["bf16"].onnx_type
    return torch.empty((), dtype=torch_dtype).numpy().dtype.type


class OnnxRuntimeBackend(Backend):
    """Runs an ONNX file with ONNX Runtime. ONNX files are untrusted input: ONNX Runtime parses
    them, and nothing in them is executed as Python."""

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None,
                 tf32: bool = False, cuda_graph: bool = False):
        path = Path(path)
        self.session = open_session(path, provider, {"use_tf32": "1" if tf32 else "0",
                                                     "enable_cuda_graph": "1" if cuda_graph else "0"}, threads)
        self.name = f"onnxruntime-{provider}"
        self.provider = provider
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.path = path
        self._inputs, self._outputs = session_io(self.session)
        self.adopt_graph(session_metadata(self.session, str(path)), str(path))

    @property
    def inputs(self) -> list[TensorMeta]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorMeta]:
        return self._outputs

    def _run_numpy(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.provider == "cuda":
            return super()._run_numpy(feeds)  # bound on the GPU (IO binding), dtypes kept
        values = self.session.run(None, feeds)
        return {meta.name: value for meta, value in zip(self._outputs, values)}

    def output_shape(self, meta: TensorMeta, symbols: dict[str, int]) -> tuple[int, ...]:
        """Resolve an output's symbolic dims ("batch", "past_sequence + sequence") from the inputs' sizes."""
        shape = []
        for dim in meta.shape:
            if isinstance(dim, int):
                shape.append(dim)
            else:
                terms = [t.strip() for t in str(dim).split("+")]
                if not all(t in symbols or t.isdigit() for t in terms):
                    raise BackendError(f"{self.name}: cannot work out the size of output {meta.name} dimension {dim!r}")
                shape.append(sum(symbols[t] if t in symbols else int(t) for t in terms))
        return tuple(shape)

    def _run_torch(self, feeds: dict) -> dict:
        """Torch tensors bound in place on the GPU (IO binding): no host round trip."""
        import torch

        if self.provider != "cuda":
            return super()._run_torch(feeds)
        binding = self.session.io_binding()
        symbols = {}
        for meta in self._inputs:
            tensor = feeds[meta.name].to("cuda").contiguous()
            feeds[meta.name] = tensor
            for dim, size in zip(meta.shape, tensor.shape):
                if isinstance(dim, str):
                    symbols[dim] = size
            binding.bind_input(meta.name, "cuda", 0, binding_type(tensor.dtype), tuple(tensor.shape), tensor.data_ptr())
        results = {}
        for meta in self._outputs:
            tensor = results[meta.name] = torch.empty(self.output_shape(meta, symbols), dtype=getattr(torch, meta.dtype),
                                                      device="cuda")
            binding.bind_output(meta.name, "cuda", 0, binding_type(tensor.dtype), tuple(tensor.shape), tensor.data_ptr())
        torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return results

    def close(self) -> None:
        super().close()
        self.session = None


def open_onnxruntime(path, spec, threads: int | None = None, **_options) -> OnnxRuntimeBackend:
    """The registry's opener for the ONNX Runtime backends (provider = the spec's device); the
    precision is the graph's own."""
    return OnnxRuntimeBackend(path, provider=spec.device, threads=threads)
