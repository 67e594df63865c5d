"""ONNX Runtime backend; the execution provider is chosen by name."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .base import Backend, BackendError, TensorMeta

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ORT_TYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
              "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16", "tensor(bool)": "bool"}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu for CUDA)") from None
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    """Runs an ONNX file with ONNX Runtime. ONNX files are untrusted input: ONNX Runtime parses
    them, and nothing in them is executed as Python."""

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None):
        ort = _import_onnxruntime()
        path = Path(path)
        if provider not in PROVIDERS:
            raise BackendError(f"unknown ONNX Runtime provider {provider!r}; choose one of {sorted(PROVIDERS)}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise BackendError(
                f"this ONNX Runtime build has no {PROVIDERS[provider]} (it has {ort.get_available_providers()}); "
                "install onnxruntime-gpu for CUDA"
            )
        if not path.is_file():
            raise BackendError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=[PROVIDERS[provider]])
        except Exception as error:  # ORT raises its own exception types for bad files
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise BackendError(f"ONNX Runtime cannot load {path}: {first}") from None
        self.name = f"onnxruntime-{provider}"
        self.path = path
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        config = json.loads(self.metadata.get("model_config", "{}"))
        self.vocab_size = config.get("num_tokens")
        self._inputs = [self._meta(arg) for arg in self.session.get_inputs()]
        self._outputs = [self._meta(arg) for arg in self.session.get_outputs()]

    @staticmethod
    def _meta(arg) -> TensorMeta:
        return TensorMeta(arg.name, _ORT_TYPES.get(arg.type, arg.type), tuple(arg.shape))

    @property
    def inputs(self) -> list[TensorMeta]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorMeta]:
        return self._outputs

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, feeds)
        return {meta.name: value for meta, value in zip(self._outputs, values)}

    def close(self) -> None:
        self.session = None
