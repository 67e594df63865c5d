"""GPU tests: run on the accelerator with `python3 -m pytest -m gpu` after staging the GPU wheels."""
from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
import torch
from gpu_requirements import onnxruntime_providers, require_onnxruntime_cuda, require_tensorrt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="session")
def ort_cuda():
    """ONNX Runtime's CUDA provider: a failure naming the wheel when CUDA is here and it is not."""
    require_onnxruntime_cuda(torch.cuda.is_available(), onnxruntime_providers())


needs_ort_cuda = pytest.mark.usefixtures("ort_cuda")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset exported six ways: plain and with past, fp32, fp16 and bf16."""
    from export.onnx_export import export_onnx
    from models.source import resolve_model

    source = resolve_model()
    folder = tmp_path_factory.mktemp("gpu")
    paths = {}
    for with_past in (False, True):
        for dtype in ("fp32", "fp16", "bf16"):
            path = folder / f"tiny-{dtype}{'-past' if with_past else ''}.onnx"
            export_onnx(source.model, path, precision=dtype, weights=source.record, with_past=with_past,
                        log=lambda _: None)
            paths[(dtype, with_past)] = path
    return source, paths


@needs_ort_cuda
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_onnxruntime_cuda_parity(tiny, dtype):
    from models.signature import graph_signature
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from runtime.backends.torch_backend import TorchBackend
    from runtime.verify.tensors import check_parity, default_cases

    source, paths = tiny
    precision = dtype
    for with_past in (False, True):
        cases = default_cases(graph_signature(source.model.config, with_past), [1, 3], [1, 17, 128, 513])
        with TorchBackend(source.model, device="cuda", with_past=with_past) as reference, \
                OnnxRuntimeBackend(paths[(dtype, with_past)], provider="cuda") as candidate:
            report = check_parity(reference, candidate, cases, precision)
        assert report, report.summary()
        logits = [r for r in report.results if r.output == "logits"]
        if dtype == "fp32":
            assert max(r.max_abs for r in logits) <= 1e-4
        elif dtype == "fp16":  # teacher forcing: every position's argmax against the fp32 reference
            assert min(r.top1 for r in logits) >= 0.99
        else:  # bf16 flips more near-ties of random weights: a 17-token case may lose one (94 %)
            assert min(r.cosine for r in logits) >= 0.9999  # the sweep's top-1 bar is in `report`
        if with_past:  # the caches are compared too (bf16: they cross numpy as ml_dtypes' bfloat16)
            assert {r.output for r in report.results} >= {"logits", "present.0.key"}


@needs_ort_cuda
def test_a_bf16_graph_with_past_generates_on_onnxruntime_cuda(tiny):
    """The decoder keeps a bfloat16 cache on the GPU, bound in place (found broken 2026-11-25)."""
    from runtime.decoding.open import open_decoder
    from runtime.verify.decoding import compare_generation, random_prompts

    source, paths = tiny
    with open_decoder(source, "torch", rows=4, device="cuda") as reference, \
            open_decoder(paths[("bf16", True)], "onnxruntime-cuda", rows=4) as candidate:
        assert set(candidate.cache_dtypes.values()) == {torch.bfloat16} and torch.device(candidate.device).type == "cuda"
        result = compare_generation(reference, candidate, random_prompts(256, batch=4, length=8), 64, "bf16")
    assert result, result.summary()
    assert result.tokens_compared == 256


@needs_ort_cuda
def test_onnxruntime_cuda_greedy_identical_and_cache_on_device(tiny):
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from runtime.decoding.open import open_decoder
    from runtime.verify.decoding import compare_generation, random_prompts

    source, paths = tiny
    with open_decoder(source, "torch", rows=2, device="cuda") as reference, \
            open_decoder(paths[("fp32", True)], "onnxruntime-cuda", rows=2) as candidate:
        result = compare_generation(reference, candidate, random_prompts(256, batch=2, length=8), 64)
        assert result, result.summary()
        assert result.tokens_compared == 128
    with OnnxRuntimeBackend(paths[("fp32", True)], provider="cuda") as backend:
        feeds = {"input_ids": torch.ones(1, 3, dtype=torch.int64, device="cuda"),
                 "attention_mask": torch.ones(1, 3, dtype=torch.int64, device="cuda")}
        for meta in backend.inputs[2:]:
            feeds[meta.name] = torch.zeros(1, meta.shape[1], 0, meta.shape[3], device="cuda")
        outputs = backend.run(feeds)
        assert all(t.is_cuda for t in outputs.values())  # IO binding: nothing comes back to the host
    with OnnxRuntimeBackend(paths[("fp16", True)], provider="cuda") as backend:  # numpy in: the same dtypes out
        feeds = {"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.ones((1, 3), np.int64)}
        for meta in backend.inputs[2:]:
            feeds[meta.name] = np.zeros((1, meta.shape[1], 0, meta.shape[3]), np.float16)
        outputs = backend.run(feeds)
        assert outputs["logits"].dtype == np.float32
        assert {v.dtype for k, v in outputs.items() if k.startswith("present")} == {np.dtype(np.float16)}


def _cuda_decoder(kind: str, source, paths, tmp_path, rows: int):
    """Each CUDA decoder kind over the tiny model, fp32."""
    from export.onnx_export import export_onnx
    from export.static_cache_graph import export_static_cache
    from runtime.decoding.open import open_decoder
    from runtime.decoding.torch_static import TorchStaticDecoder

    if kind == "torch-compile-static":  # PyTorch alone: runs without onnxruntime-gpu
        return TorchStaticDecoder(source.model, rows, 128, "cuda")
    require_onnxruntime_cuda(torch.cuda.is_available(), onnxruntime_providers())
    path = paths[("fp32", True)]
    if kind == "static":  # GroupQueryAttention runs in fp16 on CUDA; the graph's head stays float32
        path = tmp_path / "static.onnx"
        export_static_cache(source.model, path, 128, "fp16", source.record, log=lambda _: None)
    if kind == "static-portable":
        path = tmp_path / "static-portable.onnx"
        export_onnx(source.model, path, weights=source.record, static_cache=128, log=lambda _: None)
    return open_decoder(path, "onnxruntime-cuda", rows=rows)


CUDA_DECODERS = ["portable", "static", "static-portable", "torch-compile-static"]


@pytest.mark.parametrize("kind", CUDA_DECODERS)
def test_greedy_tokens_on_cuda_equal_pytorch(tiny, tmp_path, kind):
    from runtime.decoding.open import open_decoder
    from runtime.verify.decoding import compare_generation, random_prompts

    source, paths = tiny
    with open_decoder(source, "torch", rows=2, device="cuda") as reference, \
            _cuda_decoder(kind, source, paths, tmp_path, 2) as candidate:
        result = compare_generation(reference, candidate, random_prompts(256, batch=2, length=8), 64,
                                    "fp16" if kind == "static" else "fp32")
    print(kind, result.summary())
    assert result, result.summary()


@pytest.mark.parametrize("kind", CUDA_DECODERS)
def test_rows_join_and_leave_on_cuda(tiny, tmp_path, kind):
    """In-flight batching on the GPU: rows started and released between steps, each step of each
    row against PyTorch's full forward pass (fp32)."""
    source, paths = tiny
    model = copy.deepcopy(source.model).cuda()  # the fixture's model stays on the CPU for the other tests
    history = {1: [5, 6, 7, 8, 9]}
    with _cuda_decoder(kind, source, paths, tmp_path, 3) as decoder:
        decoder.start({1: history[1]})
        for step in range(12):
            if step == 3:
                history[0] = [1, 2]
                decoder.start({0: history[0]})
            if step == 7:
                decoder.release([1])
                del history[1]
                history[2] = [3] * 20
                decoder.start({2: history[2]})
            tokens = [(7 * step + row) % 256 for row in decoder.active]
            logits = decoder.step(torch.tensor(tokens, device="cuda")).float().cpu()
            for index, row in enumerate(decoder.active):
                history[row].append(tokens[index])
                with torch.inference_mode():
                    expected = model(torch.tensor([history[row]], device="cuda"))[0, -1].float().cpu()
                tolerance = 5e-2 if kind == "static" else 1e-3  # the GroupQueryAttention graph is fp16
                assert (logits[index] - expected).abs().max() < tolerance, (kind, step, row)


def _tensorrt():
    from runtime.tensorrt.library import load_tensorrt

    return require_tensorrt(torch.cuda.is_available(), lambda: load_tensorrt("auto"))


def _build(tmp_path, onnx_path, *extra):
    from runtime.commands.build_engine import main

    engine = tmp_path / (onnx_path.stem + ".engine")
    report = tmp_path / (onnx_path.stem + ".json")
    code = main([str(onnx_path), "--output", str(engine), "--json", str(report), *extra])
    assert code == 0
    return engine, json.loads(report.read_text())


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_tensorrt_builds_with_profiles_timing_cache_and_engine_cache(tiny, tmp_path, dtype):
    library = _tensorrt()
    _, paths = tiny
    onnx_path = paths[(dtype, False)]
    timing = tmp_path / "timing.cache"
    cache = tmp_path / "engines"
    flags = ["--batch", "1:2:4", "--seq", "1:64:256", "--timing-cache", str(timing), "--cache-dir", str(cache)]
    engine, first = _build(tmp_path, onnx_path, *flags)
    assert engine.stat().st_size > 0 and not first["cache_hit"]
    sidecar = json.loads((tmp_path / (engine.name + ".json")).read_text())
    assert sidecar["flavour"] == library.flavour and sidecar["library_version"] == library.version
    assert sidecar["profiles"][0]["input_ids"] == {"min": [1, 1], "opt": [2, 64], "max": [4, 256]}
    assert sidecar["compute_capability"] == "%d.%d" % torch.cuda.get_device_capability(0)
    assert timing.stat().st_size > 0
    _, second = _build(tmp_path, onnx_path, *flags)
    assert second["cache_hit"] and second["seconds"] < first["build_seconds"]
    started = time.perf_counter()
    _, rebuilt = _build(tmp_path, onnx_path, *flags, "--no-cache")
    assert not rebuilt["cache_hit"]
    print(f"{library.flavour} {dtype}: first build {first['build_seconds']:.2f} s, rebuild with timing cache "
          f"{rebuilt['build_seconds']:.2f} s, cache hit {second['seconds']:.3f} s ({time.perf_counter() - started:.1f})")


def test_tensorrt_builds_the_with_past_graph(tiny, tmp_path):
    _tensorrt()
    _, paths = tiny
    engine, report = _build(tmp_path, paths[("fp32", True)], "--batch", "1:1:2", "--seq", "1:1:64",
                            "--past", "0:32:64", "--no-cache")
    profile = report["profiles"][0]
    assert profile["attention_mask"] == {"min": [1, 1], "opt": [1, 33], "max": [2, 128]}
    assert profile["past_key_values.0.key"]["max"] == [2, 2, 64, 16]


def test_tensorrt_builds_the_portable_static_cache_graph(tiny, tmp_path):
    """The standard-ops static graph parses and builds: fixed cache buffers, a batch profile."""
    _tensorrt()
    from export.onnx_export import export_onnx

    source, _ = tiny
    path = tmp_path / "static-portable.onnx"
    export_onnx(source.model, path, weights=source.record, static_cache=128, log=lambda _: None)
    engine, report = _build(tmp_path, path, "--batch", "1:1:4", "--seq", "1:1:128", "--no-cache")
    profile = report["profiles"][0]
    assert profile["past_key_values.0.key"] == {"min": [1, 2, 128, 16], "opt": [1, 2, 128, 16], "max": [4, 2, 128, 16]}
    assert profile["positions"] == {"min": [1], "opt": [1], "max": [4]}
    assert engine.stat().st_size > 0
    print(f"portable static graph: built in {report['build_seconds']:.2f} s, {engine.stat().st_size / 2**20:.1f} MiB")


def test_tensorrt_engine_runs_or_skips_with_reason(tiny, tmp_path):
    library = _tensorrt()
    from runtime.backends.tensorrt_backend import TensorRTBackend
    from runtime.backends.torch_backend import TorchBackend
    from runtime.verify.tensors import check_parity, default_cases
    from models.signature import graph_signature
    from runtime.tensorrt.compat import can_execute

    source, paths = tiny
    cc = "%d.%d" % torch.cuda.get_device_capability(0)
    runnable, reason = can_execute(library.flavour, cc)
    engine, _ = _build(tmp_path, paths[("fp32", False)], "--no-cache")
    if not runnable:
        from runtime.tensorrt.compat import EngineIncompatible

        with pytest.raises(EngineIncompatible, match=f"compute capability {cc}"):
            TensorRTBackend(engine)
        pytest.skip(reason)
    with TorchBackend(source.model, device="cuda") as reference, TensorRTBackend(engine) as candidate:
        report = check_parity(reference, candidate, default_cases(graph_signature(source.model.config), [1, 3],
                                                                  [1, 17, 128, 513]), "fp32")
    assert report, report.summary()


@needs_ort_cuda
@pytest.mark.parametrize("preset_name", ["tiny", "small"])
def test_static_cache_decoder_on_cuda_with_graph_replay(preset_name):
    """The fast path: fp16 GroupQueryAttention graph, static cache, every step a CUDA graph replay."""
    from export.static_cache_graph import build_static_cache_graph
    from models.source import resolve_model
    from runtime.decoding.open import open_decoder
    from runtime.decoding.static_cache import StaticCacheDecoder
    from runtime.verify.decoding import check_decoder, compare_generation, random_prompts

    source = resolve_model(None, None, preset_name, 0)
    model = source.model.cuda()
    data = build_static_cache_graph(model, 1100, "fp16").SerializeToString()
    report = check_decoder(model, lambda rows: StaticCacheDecoder(data, rows, "cuda"), [1, 3],
                           [1, 17, 128, 513], steps=16, precision="fp16", device="cuda")
    print(report.summary())
    assert report, report.summary()
    assert report.top1() >= 0.99  # over the sweep, as check-parity judges it
    prompts = random_prompts(model.config.num_tokens, batch=2, length=8)
    with StaticCacheDecoder(data, 2, "cuda") as decoder, \
            open_decoder(source, "torch", rows=2, device="cuda") as reference:
        assert decoder.cuda_graph
        result = compare_generation(reference, decoder, prompts, 64, "fp16")
    print(result.summary())
    assert result, result.summary()


@needs_ort_cuda
def test_an_fp32_group_query_attention_graph_is_refused_on_cuda_in_one_sentence(tiny, tmp_path):
    from export.static_cache_graph import export_static_cache
    from runtime.backends import BackendError
    from runtime.decoding.open import open_decoder

    source, _ = tiny
    path = tmp_path / "static-fp32.onnx"
    export_static_cache(source.model, path, 64, "fp32", source.record, log=lambda _: None)
    with pytest.raises(BackendError, match="cannot replay its steps as a CUDA graph.*--dtype fp16"):
        open_decoder(path, "onnxruntime-cuda")


def test_the_fused_sampling_kernel_draws_what_the_pytorch_ops_draw():
    """Triton's kernel and the PyTorch ops share the integer hash bit for bit and keep the same
    logits (the k-th largest and all ties with it); only the logarithms differ, by an ulp at most,
    which moves a draw only at a near-tie. Tied logits (fp16 rounding to few values) included."""
    from runtime.decoding.sampling import RowSettings, choose
    from runtime.decoding.sampling_kernel import fused_choose
    from runtime.decoding.settings import GenerationSettings

    logits = torch.randn(512, 256, generator=torch.Generator().manual_seed(0)).half()
    logits[::5] = (logits[::5] * 4).round() / 4  # many ties, also at the k-th value
    settings = [GenerationSettings(8, [0.0, 0.7, 1.0, 1.3][i % 4], [0.9, 0.5, 0.0][i % 3], seed=i) for i in range(512)]
    counters = [i % 37 for i in range(512)]
    on_cpu = choose(logits, RowSettings.of(settings, counters, 256, torch.device("cpu")))
    rows = RowSettings.of(settings, counters, 256, torch.device("cuda"))
    assert fused_choose(logits.cuda(), rows) is not None, "Triton is missing"
    rows = RowSettings.of(settings, counters, 256, torch.device("cuda"))
    on_cuda = choose(logits.cuda(), rows).cpu()
    assert rows.counters.cpu().tolist() == [c + 1 for c in counters]
    assert (on_cuda == on_cpu).float().mean() >= 0.998, int((on_cuda != on_cpu).sum())
    greedy = torch.tensor([s.temperature <= 0 for s in settings])
    assert torch.equal(on_cuda[greedy], logits.float().argmax(-1)[greedy])


def test_the_candidate_gemv_kernel_computes_the_product_in_fp16():
    """What scripts/hbm_bandwidth.py --triton times must compute weight @ vector: against a
    float32 product, within fp16 rounding of the result, for every configuration."""
    from runtime.bench.gemv_kernel import CONFIGS, gemv

    weight = torch.randn(6144 + 7, 4096 + 64, device="cuda", dtype=torch.float16) * 0.02
    vector = torch.randn(1, 4096 + 64, device="cuda", dtype=torch.float16)
    reference = (weight.float() @ vector.float().t()).t()
    for config in CONFIGS:
        got = gemv(weight, vector, config).float()
        assert torch.allclose(got, reference, rtol=1e-2, atol=2e-3), (config, (got - reference).abs().max().item())


@pytest.mark.parametrize("kind", CUDA_DECODERS)
def test_a_request_gets_the_same_tokens_alone_and_batched_on_cuda(tiny, tmp_path, kind, engine_loops):
    """The engine on each CUDA decoder: greedy and seeded-sampled requests decoded four at a time
    (joining as rows free up), in the plain and the overlapped loop, equal each request decoded alone;
    half of them stop at an end-of-sequence token (overlapped, such a row is stepped once more while
    its step is read, and taken by the next request)."""
    from runtime.decoding.settings import GenerationSettings

    source, paths = tiny
    requests = [([1 + i, 2 * i + 3, 7], GenerationSettings(20 + 3 * i, [0.0, 0.9][i % 2], 0.5, seed=i))
                for i in range(6)]
    with _cuda_decoder(kind, source, paths, tmp_path, 4) as decoder:
        requests, together, overlapped, alone = engine_loops(decoder, requests)
    assert together == alone and overlapped == alone
    assert len({tuple(t) for t in alone}) == len(alone)
    assert all(len(alone[i]) < settings.max_new_tokens for i, (_, settings) in enumerate(requests) if i % 2 == 0)


def _engine_tokens(decoder, requests, overlap: bool = False) -> list[list[int]]:
    """Every (prompt, settings) request through one engine (8 rows, 64 prompt tokens a step; its
    plain or overlapped loop): the tokens of each, in order; no request may fail."""
    from runtime.decoding.engine import Engine

    engine, got = Engine(decoder, prefill_tokens=64, overlap=overlap), {}
    engine.warm_up()
    handles = [engine.submit(prompt, settings) for prompt, settings in requests]
    while not engine.idle:
        for event in engine.step():
            assert event.token is not None, event.error
            got.setdefault(event.request, []).append(event.token)
    return [got[h] for h in handles]


@needs_ort_cuda
def test_prefills_beside_the_step_give_the_same_tokens_on_cuda(tiny, tmp_path):
    """overlap_prefill: admitted rows are prefilled by a second session, its recorded prefill graphs
    queued on a stream of its own while the step's recorded graph replays; each request's tokens
    equal those with every prefill in line (greedy and sampled, prompts of many widths, rows freed
    and taken again while others decode), also with the engine's overlapped loop, and no prefill
    took the side thread."""
    from export.static_cache_graph import export_static_cache
    from runtime.decoding.open import open_decoder
    from runtime.decoding.settings import GenerationSettings

    source, _ = tiny
    path = tmp_path / "static.onnx"
    export_static_cache(source.model, path, 256, "fp16", source.record, log=lambda _: None)
    requests = [([(7 * i + j) % 256 for j in range(1 + (37 * i) % 120)],
                 GenerationSettings(5 + (11 * i) % 40, [0.0, 0.9][i % 2], 0.5, seed=i)) for i in range(40)]
    tokens = []
    for overlap in (False, True):
        with open_decoder(path, "onnxruntime-cuda", rows=8, overlap_prefill=overlap) as decoder:
            assert (decoder.beside is not None) == overlap and decoder.cuda_graph
            if overlap:
                assert decoder.prefills.stream is decoder.beside.stream and not decoder.prefills.broken
                assert decoder.recorded is not None

                def threaded(work):
                    raise AssertionError("a recorded prefill ran in the side thread")

                decoder.beside.run = threaded
            tokens.append(_engine_tokens(decoder, requests))
            if overlap:  # as the server runs it: prefills beside the step, each step queued before the last is read
                tokens.append(_engine_tokens(decoder, requests, overlap=True))
    assert tokens[0] == tokens[1] == tokens[2]
    assert [len(t) for t in tokens[1]] == [settings.max_new_tokens for _, settings in requests]


@needs_ort_cuda
def test_the_step_recorded_with_its_sampling_gives_the_same_tokens_on_cuda(tiny, tmp_path):
    """The engine's step and pick recorded as one PyTorch CUDA graph (record_step, the default on
    CUDA) give each request the tokens that ONNX Runtime's own step graph and a separate pick give:
    greedy, sampled (the fused kernel) and nucleus rows (PyTorch ops, not recorded) in one batch,
    rows freed and taken again, prompts of every prefill width up to the whole 256-token window
    (each width's prefill recorded too). Every graph was recorded, and nothing fell back."""
    from export.static_cache_graph import export_static_cache
    from runtime.decoding.open import open_decoder
    from runtime.decoding.sampling import FUSED, GREEDY
    from runtime.decoding.settings import GenerationSettings
    from runtime.decoding.static_cache import warm_up_lengths

    source, _ = tiny
    path = tmp_path / "static.onnx"
    export_static_cache(source.model, path, 256, "fp16", source.record, log=lambda _: None)
    requests = [([(5 * i + j) % 256 for j in range(1 + (29 * i) % 100)],
                 GenerationSettings(4 + (13 * i) % 40, [0.0, 0.9, 0.7][i % 3], 0.5, seed=i,
                                    top_p=0.8 if i % 9 == 8 else 1.0)) for i in range(36)]
    requests.append(([(3 * j) % 256 for j in range(200)], GenerationSettings(40, 0.9, 0.5, seed=99)))  # the whole window
    tokens = []
    for record in (False, True):
        with open_decoder(path, "onnxruntime-cuda", rows=8, record_step=record) as decoder:
            tokens.append(_engine_tokens(decoder, requests))
            if record:
                prefills = {f"prefill {width}" for width in warm_up_lengths(256)}
                assert not decoder.recorded.broken and set(decoder.recorded.graphs) == {GREEDY, FUSED}
                assert not decoder.prefills.broken and set(decoder.prefills.graphs) == prefills
            else:
                assert decoder.recorded is None
    assert tokens[0] == tokens[1]
    assert [len(t) for t in tokens[1]] == [settings.max_new_tokens for _, settings in requests]


@needs_ort_cuda
@pytest.mark.parametrize("overlap, overlapped_loop", [(False, False), (True, False), (True, True)],
                         ids=["in-line", "beside", "beside-overlapped-loop"])
def test_engine_steps_that_admit_and_release_rows_never_wait_for_the_gpu(tiny, tmp_path, overlap, overlapped_loop):
    """Once warm, a step waits only for its ids (an event): nothing it queues for an admission, a
    first pick or a release copies from the host and waits (a Python number set into one element
    of a CUDA tensor did, twice per admitted row). PyTorch's sync debug mode raises at any such wait."""
    from export.static_cache_graph import export_static_cache
    from runtime.decoding.engine import Engine
    from runtime.decoding.open import open_decoder
    from runtime.decoding.settings import GenerationSettings

    source, _ = tiny
    path = tmp_path / "static.onnx"
    export_static_cache(source.model, path, 256, "fp16", source.record, log=lambda _: None)
    requests = [([(3 * i + j) % 256 for j in range(1 + (23 * i) % 90)],
                 GenerationSettings(2 + (7 * i) % 12, [0.0, 0.9][i % 2], 0.5, seed=i)) for i in range(24)]
    with open_decoder(path, "onnxruntime-cuda", rows=4, overlap_prefill=overlap) as decoder:
        engine = Engine(decoder, overlap=overlapped_loop)
        engine.warm_up()
        for prompt, settings in requests[:4]:  # the first steps record nothing new, but run unchecked
            engine.submit(prompt, settings)
        engine.step()
        if overlapped_loop:
            engine.step()  # the first step is read here: the next one records nothing new either
        for prompt, settings in requests[4:]:
            engine.submit(prompt, settings)
        admitted = 0
        torch.cuda.set_sync_debug_mode("error")
        try:
            while not engine.idle:
                events = engine.step()
                admitted += engine.stats.admitted
                assert all(e.token is not None for e in events), [e.error for e in events if e.error]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert admitted == len(requests) - 4


FUSED_VARIANTS = [("fp32", {}), ("fp16", {}), ("bf16", {}),
                  ("fp32", {"norm": "layer", "rotary_pairing": "half", "qkv": "separate"}),
                  ("fp16", {"norm": "layer", "rotary_pairing": "half", "qkv": "separate"})]


@pytest.mark.parametrize("dtype, options", FUSED_VARIANTS)
def test_the_fused_batch1_decoder_decodes_what_pytorch_decodes(dtype, options):
    """triton-fused (its step and the engine's pick replayed as one CUDA graph) against eager PyTorch on a model of the
    small preset's shape with grouped key/value heads, in each precision and with the other norm,
    rotary pairing and QKV layout: fp32 exact greedy tokens, half precision the forced-step bars; a
    prompt long enough that the window's attention spans many chunks. The engine's overlapped loop
    gives the plain loop's tokens, greedy and sampled."""
    from models.config import ModelConfig
    from models.precision import precision as lookup_precision
    from models.source import ModelSource
    from models.transformer import build_model
    from runtime.decoding.fused_decoder import FusedDecoder
    from runtime.decoding.open import open_decoder
    from runtime.decoding.settings import GenerationSettings
    from runtime.verify.decoding import compare_generation, random_prompts

    config = ModelConfig(num_tokens=32000, dim=768, depth=4, dim_head=64, heads=12, kv_heads=4, **options)
    model = build_model(config, seed=3)
    if config.norm == "layer":  # norms that are not the identity, so that their folding is tested
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    source = ModelSource.of_model(model, "test model", "none")
    with open_decoder(source, "torch", rows=1, device="cuda", precision=dtype) as reference, \
            FusedDecoder(model, 512, "cuda", lookup_precision(dtype).torch_dtype) as candidate:
        assert candidate.graph is not None
        assert candidate.fused.pdl == (torch.cuda.get_device_capability()[0] >= 9)  # Hopper: the products use PDL
        result = compare_generation(reference, candidate, random_prompts(32000, batch=1, length=300), 96, dtype)
        assert candidate.recorded.graphs and not candidate.recorded.broken  # generate replayed step + pick
        prompt = random_prompts(32000, batch=1, length=300, seed=1)[0]
        for settings in (GenerationSettings(64), GenerationSettings(64, 0.9, 0.5, seed=5)):  # greedy, sampled
            plain = _engine_tokens(candidate, [(prompt, settings)])
            assert _engine_tokens(candidate, [(prompt, settings)], overlap=True) == plain, settings
    print("triton-fused", dtype, options, result.summary())
    assert result, result.summary()
