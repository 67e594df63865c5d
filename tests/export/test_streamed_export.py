"""The streamed export: a weightless trace whose initializers read the checkpoint when written.

It must write exactly the weights the exporter writes when it traces the model in memory (and
lets its optimizer fold every Linear's Transpose), and hold one tensor at a time: a model several
times larger than a memory cap set on the exporting process still exports."""
from __future__ import annotations

import collections
import copy
import hashlib
import json
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch
from onnx import numpy_helper

from export import onnx_export
from export.onnx_export import _example_inputs, _quiet_exporter, _static_example_inputs, example_sizes, export_onnx
from models.checkpoints import save_checkpoint_shards
from models.precision import precision
from models.signature import graph_signature, static_cache_signature
from models.weights import ModelWeights
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def in_memory_trace(model, dtype: str, with_past: bool = False, static_cache: int | None = None):
    """What the exporter writes from the model in memory: a copy in the graph's dtype, traced and
    optimized by torch.onnx itself (the export this project did before streaming)."""
    row = precision(dtype)
    model = copy.deepcopy(model).to(row.torch_dtype).use_float32_softmax(row.name != "fp32").eval()
    sizes = example_sizes(model.config, static_cache)
    if static_cache:
        signature = static_cache_signature(model.config, static_cache, row.dtype, portable=True)
        module, args, shapes, _ = _static_example_inputs(model, signature, sizes, row, static_cache)
    else:
        signature = graph_signature(model.config, with_past, row.dtype)
        module, args, shapes, _ = _example_inputs(model, signature, sizes, row)
    with _quiet_exporter():
        program = torch.onnx.export(module, args, None, input_names=signature.input_names,
                                    output_names=signature.output_names, opset_version=18, dynamo=True,
                                    dynamic_shapes=shapes, optimize=True)
    return program.model_proto


def weight_digests(proto) -> list[tuple]:
    return sorted((tuple(t.dims), t.data_type, hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest())
                  for t in proto.graph.initializer)


def op_counts(proto) -> collections.Counter:
    return collections.Counter(node.op_type for node in proto.graph.node)


@pytest.mark.parametrize("dtype, with_past, static_cache", [("fp16", True, None), ("fp32", False, 64)],
                         ids=["fp16-with-past-from-shards", "fp32-static-portable"])
def test_the_streamed_export_writes_the_weights_of_an_in_memory_trace_byte_for_byte(
        tmp_path, tiny_model, dtype, with_past, static_cache):
    weights = ModelWeights.of(tiny_model)
    if with_past:  # read from a sharded checkpoint, two shards at least
        from models.checkpoints import open_checkpoint

        folder = save_checkpoint_shards(tiny_model, tmp_path / "shards", max_shard_bytes=100_000)
        assert len(list(folder.glob("*.safetensors"))) >= 2
        weights = open_checkpoint(folder).weights
    output = tmp_path / "m.onnx"
    export_onnx(weights, output, precision=dtype, with_past=with_past, static_cache=static_cache,
                log=lambda _: None)
    streamed = onnx.load(str(output))
    reference = in_memory_trace(tiny_model, dtype, with_past, static_cache)
    assert weight_digests(streamed) == weight_digests(reference)
    assert op_counts(streamed) == op_counts(reference)


def test_a_graph_past_the_inline_limit_streams_its_weights_into_aligned_external_data(
        tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(onnx_export, "INLINE_GRAPH_BYTES", 0)
    output = tmp_path / "m.onnx"
    export_onnx(tiny_model, output, log=lambda _: None)
    graph = onnx.load(str(output), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(int({e.key: e.value for e in t.external_data}["offset"]) % 4096 == 0 for t in external)
    inline = onnx.load(str(output))  # the data file holds the same weights as an in-memory trace
    assert weight_digests(inline) == weight_digests(in_memory_trace(tiny_model, "fp32"))


CAPPED_EXPORT = textwrap.dedent("""
    import json, resource, sys
    from runtime.commands import export_model
    from models.checkpoints import load_checkpoint

    def vm_data():
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData"))

    import export.onnx_export, torch.onnx  # imports are the same whatever the model's size
    export.onnx_export.INLINE_GRAPH_BYTES = 0  # the path a graph past 512 MiB takes, for this smaller one
    cap = vm_data() + int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    code = export_model.main(["--checkpoint", sys.argv[1], "--output", sys.argv[2], "--dtype", "fp16", "--no-verify"])
    try:
        load_checkpoint(sys.argv[1])
        loaded = True
    except MemoryError:
        loaded = False
    print(json.dumps({"code": code, "loaded_in_memory": loaded}))
""")


HEADROOM = 370 << 20  # the exporter's own working memory (~320 MB on this model) and one tensor


def test_a_model_several_times_larger_than_the_memory_cap_still_exports(tmp_path):
    """RLIMIT_DATA caps the process's heap and private mappings (a memory map of the checkpoint would count):
    the export gets HEADROOM above what its imports took; the model's float32 weights are 3x that."""
    from models.config import ModelConfig
    from models.random_weights import write_random_checkpoint

    config = ModelConfig(num_tokens=8000, dim=2048, depth=6, dim_head=64, heads=32, kv_heads=8)
    folder = write_random_checkpoint(config, tmp_path / "shards", max_shard_bytes=256 << 20)
    model_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    headroom = HEADROOM
    assert model_bytes > 3 * headroom
    script = tmp_path / "capped.py"
    script.write_text(CAPPED_EXPORT)
    done = subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / "m.onnx"), str(headroom)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded_in_memory": False}, done.stderr[-2000:]  # the cap does bite
    graph = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    written = (tmp_path / "m.onnx.data").stat().st_size
    assert written >= model_bytes // 2 and {t.data_type for t in graph.graph.initializer if t.dims} >= {10}  # fp16
