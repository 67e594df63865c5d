"""triton-fused's kernels, run by Triton's interpreter on the CPU (fp32, launched step by step rather
than as a CUDA graph): its logits against the static-cache model's eager step, for both norms, both
rotary pairings, both QKV layouts, grouped key/value heads and a window of several attention chunks;
and the engine's plain and overlapped loops over it. The GPU suite checks the compiled kernels and the CUDA graph against eager PyTorch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import torch
from models.config import ModelConfig
from models.transformer import build_model
from runtime.decoding.fused_decoder import FusedDecoder
from runtime.decoding.torch_static import TorchStaticDecoder

# (options, chunk, window, prompt length): the third has chunks of 128 positions, attended in blocks of 64,
# so the kernel's loop over a chunk's later blocks runs
CASES = (({}, 16, 48, 28), ({"norm": "layer", "rotary_pairing": "half", "qkv": "separate"}, 16, 48, 28),
         ({"rotary_pairing": "half"}, 128, 300, 124))
for options, chunk, window, start in CASES:
    config = ModelConfig(num_tokens=97, dim=64, depth=2, dim_head=16, heads=4, kv_heads=2, **options)
    model = build_model(config, seed=1)
    with torch.no_grad():  # norms that are not the identity, so folding them into the products is tested
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    reference = TorchStaticDecoder(model, 1, window, "cpu", torch.float32, compile=False)
    fused = FusedDecoder(model, window, "cpu", torch.float32, graph=False, chunk=chunk)
    prompt = [(7 * i + 3) % 97 for i in range(start)]
    expected, got = reference.start({0: prompt}), fused.start({0: prompt})
    worst = (expected - got).abs().max().item()
    for _ in range(9):  # e.g. from position 28 to 36: the new token in the second chunk, then the third
        token = expected.argmax(-1)
        # partials of chunks past the new token's hold garbage: the combine must read only those written
        for buffer, value in ((fused.fused.part_max, 50.0), (fused.fused.part_sum, 1.0), (fused.fused.part_out, 1e3)):
            buffer.fill_(value)
        expected, got = reference.step(token), fused.step(token)
        worst = max(worst, (expected - got).abs().max().item())
    print(worst, expected.abs().max().item())

# the engine's plain and overlapped loops over the fused step give the same tokens, and greedy ones
# equal the static-cache model's
from runtime.decoding.engine import Engine
from runtime.decoding.settings import GenerationSettings

def engine_tokens(decoder, settings, overlap):
    engine, got = Engine(decoder, overlap=overlap), []
    engine.submit(prompt, settings)
    while not engine.idle:
        got += [event.token for event in engine.step()]
    return got

model = build_model(ModelConfig(num_tokens=97, dim=64, depth=2, dim_head=16, heads=4, kv_heads=2), seed=1)
fused = FusedDecoder(model, 48, "cpu", torch.float32, graph=False, chunk=16)
reference = TorchStaticDecoder(model, 1, 48, "cpu", torch.float32, compile=False)
prompt = [(5 * i + 2) % 97 for i in range(20)]
for settings in (GenerationSettings(8), GenerationSettings(8, 0.9, 0.5, seed=5)):
    plain = engine_tokens(fused, settings, False)
    same = plain == engine_tokens(fused, settings, True) and (settings.temperature > 0 or
                                                              plain == engine_tokens(reference, settings, False))
    print("engine", int(same), len(plain), len(set(plain)))
"""


def test_the_fused_step_computes_the_static_cache_models_logits():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().split("\n")
    for line in lines[:3]:
        worst, scale = map(float, line.split())
        assert scale > 0.1 and worst < 1e-5 * max(1.0, scale), line
    assert [line.split()[:3] for line in lines[3:]] == [["engine", "1", "8"]] * 2, lines[3:]
    assert all(int(line.split()[3]) > 1 for line in lines[3:]), lines[3:]  # not one token repeated


@pytest.mark.parametrize("change, message", [
    ({"rows": 2}, r"decodes one row \(batch 1\), not 2; for batches use onnxruntime-cuda-static"),
    ({"causal": False}, r"causal models only"),
    ({"dim_head": 24}, r"dim_head a power of two of at least 16, not 24"),
])
def test_what_the_fused_step_cannot_run_is_refused_in_one_sentence(change, message):
    from models.config import ModelConfig
    from models.transformer import build_model
    from runtime.decoding.base import DecodingError
    from runtime.decoding.fused_decoder import FusedDecoder

    rows = change.pop("rows", 1)
    model = build_model(ModelConfig(**{"num_tokens": 32, "dim": 48, "depth": 1, "dim_head": 16, "heads": 3, **change}))
    with pytest.raises(DecodingError, match=message):
        FusedDecoder(model, 32, "cpu", torch.float32, rows=rows, graph=False)


def test_the_opener_refuses_from_the_config_without_loading_the_weights():
    from models.config import ModelConfig
    from runtime.decoding.base import DecodingError
    from runtime.decoding.fused_decoder import open_fused
    from runtime.registry import backend_spec

    class Source:
        config = ModelConfig(num_tokens=32, dim=48, depth=1, dim_head=16, heads=3)

        @property
        def model(self):
            raise AssertionError("the weights were loaded for a refusal")

    with pytest.raises(DecodingError, match=r"decodes one row \(batch 1\), not 4"):
        open_fused(Source(), backend_spec("triton-fused"), rows=4, max_cache=64)


def test_layer_norm_products_hold_no_autograd_graph():
    from models.config import ModelConfig
    from models.static_cache import StaticCacheModel
    from models.transformer import build_model
    from runtime.decoding.fused_decoder import FusedStep

    model = build_model(ModelConfig(num_tokens=32, dim=48, depth=1, dim_head=16, heads=3, norm="layer", qkv="separate"))
    step = FusedStep(StaticCacheModel(model, 1, 32))
    qkv = step.layers[0][0]
    assert not qkv.weight.requires_grad and qkv.gamma_row_sums.grad_fn is None and qkv.beta_products.grad_fn is None


def test_benchmark_takes_a_dtype_for_weights_and_refuses_one_that_contradicts_the_graph(tmp_path):
    import argparse

    from models.errors import ToolkitError
    from runtime.commands.benchmark import Targets

    weights = Targets(argparse.Namespace(model=None, dtype="fp16"))
    assert weights.precision() == "fp16"
    assert Targets(argparse.Namespace(model=None, dtype=None)).precision() == "fp32"
    graph = Targets.__new__(Targets)
    graph.args = argparse.Namespace(model="m.onnx", dtype="bf16")
    graph.metadata = argparse.Namespace(precision="fp16")
    with pytest.raises(ToolkitError, match="MODEL is fp16 and --dtype asks for bf16"):
        graph.precision()


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_the_fused_kernels_compile_for_hopper(dtype, tmp_path, monkeypatch):
    """The interpreter runs the kernels as Python, so typing rules of the compiler (e.g. a loop
    variable that changes type) only show when they are compiled: compile each launch variant of the
    step for sm_90 (to a cubin: Triton ships ptxas), as the GPU would, without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from runtime.decoding import fused_triton

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compiled here, not found in a cache
    value = f"*{dtype}"

    def compile_(kernel, pointers: dict, scalars: dict, constants: dict, pdl: bool):
        signature = {**pointers, **scalars, **{name: "constexpr" for name in constants}}
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options={"launch_pdl": True} if pdl else {})
        assert compiled.asm["cubin"], kernel

    for half, chunk in ((False, 64), (True, 128)):
        compile_(fused_triton.attention_kernel,
                 {"qkv": value, "keys": value, "values": value, "position_ptr": "*i64", "inv_freq": "*fp32",
                  "part_max": "*fp32", "part_sum": "*fp32", "part_out": "*fp32"}, {"window": "i32", "scale": "fp32"},
                 dict(HEADS=32, KV_HEADS=8, D=128, GROUPS=4, GROUPS_PAD=16, CHUNK=chunk, BLOCK_T=64,
                      HALF_PAIRING=half, IEEE=dtype == "fp32"), False)
    for pdl in (False, True):
        compile_(fused_triton.combine_kernel, {"part_max": "*fp32", "part_sum": "*fp32", "part_out": "*fp32",
                                               "position_ptr": "*i64", "out": value}, {},
                 dict(CHUNK=64, CHUNKS=17, CHUNKS_PAD=32, D=128, TRIGGER=pdl), False)
        for norm, bias, gelu, residual in ((0, False, False, True), (1, False, False, False), (2, True, True, False),
                                           (0, True, False, True)):
            compile_(fused_triton.norm_gemv_kernel,
                     {"weight": value, "vector": value, "out": value, "gamma": value, "gamma_row_sums": "*fp32",
                      "beta_products": "*fp32", "bias": value, "residual": value},
                     {"n": "i32", "k": "i32", "stride_n": "i32", "eps": "fp32"},
                     dict(NORM=norm, HAS_BIAS=bias, GELU=gelu, HAS_RESIDUAL=residual, BLOCK_N=8, BLOCK_K=512, PDL=pdl),
                     pdl)
