"""The fast decode path: a static-cache graph (export/static_cache_graph.py) on ONNX Runtime.

The key/value cache lives in preallocated buffers bound as both past and present (IO binding),
so a decode step has fixed shapes and addresses; on CUDA each step is then replayed as one CUDA
graph (ONNX Runtime's `enable_cuda_graph`), which removes the per-node launch overhead that
dominates a batch-1 step. Prefill runs outside the graph (`gpu_graph_id` -1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from export.static_cache_graph import GRAPH_KIND
from models.config import ModelConfig

from .backends import BackendError
from .backends.onnxruntime_backend import _import_onnxruntime, _numpy_dtype, open_session
from .generation import GenerationError, GenerationResult, GenerationSettings, check_request, sample_loop


def is_static_cache_graph(metadata: dict[str, str]) -> bool:
    return metadata.get("graph_kind") == GRAPH_KIND


def right_pad(prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Ragged prompts -> (ids (b, width), lengths (b,)), padded on the right with token 0."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.int64)


class StaticCacheDecoder:
    """Prefill a batch of prompts once, then decode one token per row per `step`.

    `model` is a path or serialized bytes of a static-cache graph. Not thread-safe: one decoder
    owns its cache buffers.
    """

    def __init__(self, model: str | Path | bytes, batch: int, provider: str = "cuda", cuda_graph: bool | None = None):
        self.cuda_graph = provider == "cuda" if cuda_graph is None else cuda_graph
        self.session = open_session(model, provider, {"enable_cuda_graph": str(int(self.cuda_graph))})
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if not is_static_cache_graph(self.metadata):
            raise BackendError("not a static-cache graph (export it with export-model --static-cache N)")
        self.config = ModelConfig.from_json(self.metadata["model_config"])
        self.max_cache = int(self.metadata["max_cache"])
        self.name = f"onnxruntime-{provider}-static-cache"
        self.provider, self.batch = provider, batch
        self.device = torch.device("cuda" if provider == "cuda" else "cpu")
        self.vocab_size = self.config.num_tokens
        self.cache_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        cache_dtype = torch.float16 if self.metadata.get("precision") == "float16" else torch.float32
        c = self.config
        self.caches = {name: torch.zeros(batch, c.kv_heads, self.max_cache, c.dim_head, dtype=cache_dtype,
                                         device=self.device) for name in self.cache_names}
        self.step_ids = torch.zeros(batch, 1, dtype=torch.int64, device=self.device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.step_logits = torch.zeros(batch, 1, c.num_tokens, dtype=torch.float32, device=self.device)
        self.lengths: Tensor | None = None  # tokens held per row (host copy)
        self._step_binding = self._binding(self.step_ids, self.seqlens, self.max_cache, self.step_logits)
        ort = _import_onnxruntime()
        self._run_options = {name: ort.RunOptions() for name in ("prefill", "step")}
        if self.cuda_graph:
            self._run_options["prefill"].add_run_config_entry("gpu_graph_id", "-1")  # variable shapes: no graph
            self._run_options["step"].add_run_config_entry("gpu_graph_id", "1")

    def _bind(self, binding, name: str, tensor: Tensor, output: bool = False) -> None:
        method = binding.bind_output if output else binding.bind_input
        method(name, self.device.type, 0, _numpy_dtype(tensor.dtype), tuple(tensor.shape), tensor.data_ptr())

    def _binding(self, ids: Tensor, seqlens: Tensor, total: int, logits: Tensor):
        binding = self.session.io_binding()
        self._bind(binding, "input_ids", ids)
        self._bind(binding, "seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", np.array(total, dtype=np.int32))
        for name, buffer in self.caches.items():  # past and present share the buffer
            self._bind(binding, name, buffer)
            self._bind(binding, name.replace("past_key_values.", "present."), buffer, output=True)
        self._bind(binding, "logits", logits, output=True)
        return binding

    def _run(self, binding, kind: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # ONNX Runtime runs on its own stream
        self.session.run_with_iobinding(binding, self._run_options[kind])

    def prefill(self, prompts: list[list[int]]) -> Tensor:
        """Fill the cache with the (right-padded) prompts; return logits (b, width, vocab).
        Row r's next-token logits are at position len(prompts[r]) - 1."""
        if len(prompts) != self.batch:
            raise GenerationError(f"this decoder was set up for batch {self.batch}, got {len(prompts)} prompts")
        ids, lengths = right_pad(prompts)
        if ids.shape[1] > self.max_cache:
            raise GenerationError(f"a {ids.shape[1]}-token prompt does not fit the graph's {self.max_cache}-token "
                                  "static cache; re-export with a larger --static-cache")
        ids = ids.to(self.device)
        seqlens = (lengths - 1).to(torch.int32).to(self.device)
        logits = torch.empty(self.batch, ids.shape[1], self.config.num_tokens, dtype=torch.float32, device=self.device)
        self._run(self._binding(ids, seqlens, ids.shape[1], logits), "prefill")
        self.lengths = lengths.clone()
        self.seqlens.copy_(seqlens)
        return logits

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token per row; return its next-token logits (b, vocab). The returned tensor
        is the decoder's output buffer: read it before the next step."""
        if self.lengths is None:
            raise GenerationError("call prefill before step")
        if int(self.lengths.max()) >= self.max_cache:
            raise GenerationError(f"the static cache holds {self.max_cache} tokens and is full; re-export with a "
                                  "larger --static-cache or ask for fewer new tokens")
        self.step_ids.copy_(tokens.reshape(self.batch, 1))
        self.seqlens.add_(1)
        if not self.cuda_graph:  # without a graph, the true longest row keeps attention short
            self._step_binding.bind_cpu_input("total_sequence_length",
                                              np.array(int(self.lengths.max()) + 1, dtype=np.int32))
        self._run(self._step_binding, "step")
        self.lengths += 1
        return self.step_logits[:, 0]

    def generate(self, prompts: list[list[int]], settings: GenerationSettings, on_tokens=None,
                 record_margins: bool = False) -> GenerationResult:
        """Sample as runtime.generation.Generator does (same settings and semantics)."""
        check_request(prompts, settings, self.vocab_size, self.max_cache,
                      f"the graph's {self.max_cache}-token static cache; re-export with a larger --static-cache")

        def prefill() -> Tensor:
            logits = self.prefill(prompts)
            return logits[torch.arange(len(prompts)), (self.lengths - 1).to(self.device)]

        return sample_loop(prefill, self.step, len(prompts), settings, self.device, on_tokens, record_margins)

    def close(self) -> None:
        self.session = self._step_binding = None
        self.caches.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def static_cache_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of `path` if it is an ONNX file written by export-model --static-cache, else
    None (read without loading the weights)."""
    import onnx

    path = Path(path)
    if path.suffix != ".onnx" or not path.is_file():
        return None
    metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return metadata if is_static_cache_graph(metadata) else None
