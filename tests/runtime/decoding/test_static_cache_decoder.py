"""The static-cache decoder (GroupQueryAttention graph) against PyTorch on the CPU: model variants,
fp16, capacity and what it refuses."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from export.static_cache_graph import build_static_cache_graph
from models.transformer import build_model
from runtime.backends import BackendError
from runtime.decoding.base import DecodingError
from runtime.decoding.captured_step import CapturedSteps
from runtime.decoding.generation import GenerationSettings, generate
from runtime.decoding.static_cache import StaticCacheDecoder, contiguous_runs, prefill_width, warm_up_lengths
from runtime.verify.decoding import check_decoder


def _decoder_factory(model, max_cache=64, precision="fp32"):
    data = build_static_cache_graph(model, max_cache, precision).SerializeToString()
    return lambda rows: StaticCacheDecoder(data, rows, "cpu")


@pytest.mark.parametrize("variant", [{}, {"norm": "layer", "ff_bias": False},
                                     {"qkv": "separate", "rotary_pairing": "half", "kv_heads": 1}])
def test_prompt_and_decode_steps_match_pytorch_for_model_variants(tiny_config, variant):
    model = build_model(dataclasses.replace(tiny_config, **variant), seed=1)
    report = check_decoder(model, _decoder_factory(model), [1, 3], [1, 5, 40], steps=8)
    assert report, report.summary()
    assert len(report.results) == 12 and max(r.max_abs for r in report.results) < 1e-5
    assert {r.output for r in report.results} == {"logits (prompt)", "logits (8 decode steps)"}


def test_fp16_graph_is_within_the_half_precision_tolerance(tiny_model):
    report = check_decoder(tiny_model, _decoder_factory(tiny_model, precision="fp16"), [3], [17], steps=8,
                           precision="fp16")
    assert report, report.summary()
    assert min(r.top1 for r in report.results) >= 0.99


def test_a_full_cache_and_an_overlong_request_are_refused(tiny_model):
    with _decoder_factory(tiny_model, max_cache=16)(1) as decoder:
        with pytest.raises(DecodingError, match="past the graph's 16-token static cache"):
            generate(decoder, [[1] * 10], GenerationSettings(max_new_tokens=8))
        with pytest.raises(DecodingError, match="a 17-token prompt is longer than the graph's 16-token static cache"):
            decoder.start({0: [1] * 17})
        decoder.start({0: [1] * 15})
        decoder.step(torch.tensor([1]))
        with pytest.raises(DecodingError, match="holds 16 tokens and is full .the graph's 16-token static cache"):
            decoder.step(torch.tensor([1]))


def test_a_portable_graph_is_not_a_static_cache_graph(tiny_onnx):
    with pytest.raises(BackendError, match="not a static-cache graph"):
        StaticCacheDecoder(tiny_onnx, 1, "cpu")


def test_started_rows_are_prefilled_in_contiguous_runs():
    assert contiguous_runs([5, 0, 1, 2, 6, 9]) == [[0, 1, 2], [5, 6], [9]]


def test_cuda_prefills_run_at_a_few_widths_and_warm_up_runs_each_of_them():
    assert [prefill_width(w, 2048) for w in (1, 2, 3, 17, 513, 1024, 1500, 2048)] == [1, 2, 4, 32, 1024, 1024, 2048, 2048]
    assert prefill_width(90, 100) == 100
    assert warm_up_lengths(2048) == [2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert warm_up_lengths(100) == [100, 64, 32, 16, 8, 4, 2, 1] and warm_up_lengths(1) == [1]
    assert {prefill_width(w, 100) for w in range(1, 101)} <= set(warm_up_lengths(100))


@pytest.mark.parametrize("portable", [False, True])
def test_prompts_padded_to_a_warmed_width_give_the_same_logits(tiny_model, portable):
    """What CUDA does (pad_prefill), checked on the CPU: the padding is written past each row's
    length and never attended to, so prompt and decode-step logits do not change."""
    from export.onnx_export import build_portable_static_graph

    build = build_portable_static_graph if portable else build_static_cache_graph
    data = build(tiny_model, 64, "fp32").SerializeToString()
    prompts = {0: [3, 1, 4, 1, 5], 1: [9, 2, 6, 5, 3, 5, 8, 9, 7]}  # widths 9 -> 16
    outputs = []
    for pad in (False, True):
        with StaticCacheDecoder(data, 2, "cpu") as decoder:
            decoder.pad_prefill = pad
            logits = [decoder.start(prompts)]
            for token in (7, 11, 13):
                logits.append(decoder.step(torch.tensor([token, token + 1])))
        outputs.append(torch.stack(logits))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


@pytest.mark.parametrize("portable", [False, True])
def test_staged_prefills_land_in_their_rows_with_the_logits_of_the_batched_prefill(tiny_model, portable):
    """What CUDA does for a server's admissions (staged_prefill: one row at a time through fixed
    buffers, then copied into the row), checked on the CPU against the batched prefill: rows start
    at different steps, a shorter prompt follows a longer one in the staging row, and a released
    row is started again."""
    from export.onnx_export import build_portable_static_graph

    build = build_portable_static_graph if portable else build_static_cache_graph
    data = build(tiny_model, 64, "fp32").SerializeToString()
    outputs = []
    for staged in (False, True):
        with StaticCacheDecoder(data, 3, "cpu", staged_prefill=staged) as decoder:
            assert decoder.staged_prefill == staged
            logits = [decoder.start({0: [9, 2, 6, 5, 3, 5, 8, 9, 7, 1, 2, 3, 4, 5, 6, 7, 8]})]  # width 32
            logits.append(decoder.step(torch.tensor([7])))
            logits.append(decoder.start({2: [3, 1, 4], 1: [2, 7, 1, 8, 2]}))
            for token in (7, 11):
                logits.append(decoder.step(torch.tensor([token, token + 1, token + 2])))
            decoder.release([1])
            logits.append(decoder.start({1: [5]}))
            logits.append(decoder.step(torch.tensor([1, 2, 3])))
        outputs.append(torch.cat([x.reshape(-1, x.shape[-1]) for x in logits]))
    assert outputs[0].shape == (1 + 1 + 2 + 3 + 3 + 1 + 3, tiny_model.config.num_tokens)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


@pytest.mark.parametrize("portable", [False, True])
def test_prefills_beside_a_step_give_the_logits_of_prefills_in_line(tiny_model, portable):
    """overlap_prefill: rows started with start_beside are prefilled by a second session in a thread
    of its own while the step runs (on the CPU too, truly concurrently: ONNX Runtime drops the GIL),
    into the same cache block; the stepping row and the started rows see what they would in line."""
    from export.onnx_export import build_portable_static_graph

    build = build_portable_static_graph if portable else build_static_cache_graph
    data = build(tiny_model, 64, "fp32").SerializeToString()
    prompts = {2: [3, 1, 4] * 9, 1: [2, 7, 1, 8, 2]}
    outputs = []
    for overlap in (False, True):
        with StaticCacheDecoder(data, 3, "cpu", staged_prefill=True, overlap_prefill=overlap) as decoder:
            logits = [decoder.start({0: [9, 2, 6, 5, 3, 5, 8, 9, 7]})]
            for token in (7, 9):  # row 0 steps while rows 1 and 2 are prefilled beside it (twice: row 2 again)
                finish = decoder.start_beside(prompts)
                assert (finish is None) == (not overlap) and decoder.active == [0]
                logits.append(decoder.step_every_row(torch.tensor([token, 0, 0]))[:1].clone())
                logits.append(finish() if overlap else decoder.start(prompts))
                assert decoder.lengths == {0: 10 if token == 7 else 12, 1: 5, 2: 27}
                logits.append(decoder.step(torch.tensor([token, token + 1, token + 2])))
                decoder.release([1, 2])
            with pytest.raises(DecodingError, match="start_beside\\(\\) starts idle rows only; row 0 is active"):
                decoder.start_beside({0: [1]})
        outputs.append(torch.cat([x.reshape(-1, x.shape[-1]) for x in logits]))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)


def test_a_start_beside_is_completed_once_and_a_failed_one_leaves_its_rows_idle(tiny_model):
    data = build_static_cache_graph(tiny_model, 64, "fp32").SerializeToString()
    with StaticCacheDecoder(data, 3, "cpu", staged_prefill=True, overlap_prefill=True) as decoder:
        decoder.start({0: [5, 6, 7]})
        finish = decoder.start_beside({1: [1, 2, 3]})
        with pytest.raises(DecodingError, match="row 1 is active or starting"):
            decoder.start_beside({1: [4]})
        decoder.step_every_row(torch.tensor([1, 0, 0]))
        finish()
        with pytest.raises(DecodingError, match="completed already"):
            finish()
        assert decoder.lengths == {0: 4, 1: 3} and decoder.held.tolist() == [4, 3, 0]

        def broken(width):
            raise RuntimeError("the side session fell over")

        decoder.stage_runner.prefill_staged = broken
        finish = decoder.start_beside({2: [8, 9]})
        assert decoder.held.tolist() == [4, 3, 63]  # parked while it lands
        with pytest.raises(RuntimeError, match="the side session fell over"):
            finish()
        assert decoder.lengths == {0: 4, 1: 3} and decoder.held.tolist() == [4, 3, 0] and not decoder._parked


def test_the_engine_gives_the_same_tokens_with_prefills_beside_its_steps(tiny_model):
    from runtime.decoding.engine import Engine

    data = build_static_cache_graph(tiny_model, 64, "fp32").SerializeToString()
    requests = [([1 + i, 2 * i + 3, 5] * (1 + i % 4), GenerationSettings(3 + 2 * i % 7, 0.9 * (i % 2), 0.5, seed=i))
                for i in range(10)]
    tokens = []
    for overlap in (False, True):
        with StaticCacheDecoder(data, 3, "cpu", staged_prefill=True, overlap_prefill=overlap) as decoder:
            engine = Engine(decoder, prefill_tokens=8)  # joined a few per step, beside running rows
            handles = [engine.submit(prompt, settings) for prompt, settings in requests]
            got = {handle: [] for handle in handles}
            while not engine.idle:
                for event in engine.step():
                    got[event.request].append(event.token)
            tokens.append([got[handle] for handle in handles])
    assert tokens[0] == tokens[1] and all(tokens[0])


class PlayedSteps(CapturedSteps):
    """The recorded graphs played on the CPU: recording keeps the work and runs nothing, a replay runs
    it into the ids buffer, as a CUDA graph replays its kernels into the addresses it recorded."""

    def __init__(self):
        super().__init__(None)
        self.captures: list[tuple[str, bool]] = []  # (key, whether this pick had run unrecorded first)
        self.replays: list[str] = []

    def record(self, key, tokens, pick, work):
        self.captures.append((key, self._ran.get(key, (None, None))[1] is pick))
        return super().record(key, tokens, pick, work)

    def replay(self, key):
        self.replays.append(key)
        return super().replay(key)

    def _capture(self, work, tokens):
        ids = torch.zeros_like(tokens)

        def play(graph):
            written = work()  # a staged prefill writes the cache and returns nothing
            if written is not None:
                ids.copy_(written)

        return type("Graph", (), {"replay": play})(), ids


def _served(decoder, requests, seen: list) -> list[list[int]]:
    """The requests' tokens through one engine; `seen` gets each step's logits and the rows' lengths."""
    from runtime.decoding.engine import Engine

    def record(handles, logits):
        seen.append((logits.clone(), dict(decoder.lengths)))

    engine = Engine(decoder, prefill_tokens=8, on_logits=record)
    handles = [engine.submit(prompt, settings, forced) for prompt, settings, forced in requests]
    got = {handle: [] for handle in handles}
    while not engine.idle:
        for event in engine.step():
            assert event.token is not None, event.error
            got[event.request].append(event.token)
    return [got[handle] for handle in handles]


@pytest.mark.parametrize("portable", [False, True])
def test_a_recorded_step_and_pick_give_what_the_step_then_the_pick_give(tiny_model, portable):
    """The recorded path's host side (what is recorded when, replays, the rows' lengths, teacher
    forcing and on_logits after a replay, a second engine on the same decoder recording anew, each
    prefill width recorded, in line or queued beside the step, windows up to the whole cache) with
    the graphs played on the CPU, against the decoder that steps and then picks and prefills
    through ONNX Runtime."""
    from export.onnx_export import build_portable_static_graph

    data = (build_portable_static_graph if portable else build_static_cache_graph)(tiny_model, 64, "fp32")
    data = data.SerializeToString()
    greedy = GenerationSettings(6)
    requests = [([1 + i, 2 * i + 3, 5] * (1 + i % 3), greedy if i % 3 else GenerationSettings(4, 0.9, 0.5, seed=i),
                 [7, 8, 9, 10, 11] if i == 4 else None) for i in range(8)]
    # windows of 64: the copy reaches the row's last position, past the prompt's padding
    requests += [([(3 * j + n) % 50 + 1 for j in range(n)], GenerationSettings(new), None) for n, new in ((33, 5), (40, 9), (63, 1))]
    runs = []
    for played, beside in ((False, False), (True, False), (True, True)):  # beside: prefills queued on a side session
        with StaticCacheDecoder(data, 3, "cpu", staged_prefill=True, overlap_prefill=beside) as decoder:
            if played:  # the staged prefills recorded as at open, one graph per width
                if beside:
                    decoder.beside.run = None  # recorded prefills are queued, never run in the side thread
                decoder.recorded, decoder.prefills = PlayedSteps(), PlayedSteps()
                decoder._record_prefills()
                widths = [f"prefill {width}" for width in decoder.stage_runner.staged]
                assert [key for key, _ in decoder.prefills.captures] == widths
            seen: list = []
            runs.append((_served(decoder, requests, seen), _served(decoder, requests[1:3], seen), seen))
            if played:  # greedy only (sampling on the CPU takes the PyTorch ops): once per engine, on its second use
                assert decoder.recorded.captures == [("greedy", True)] * 2 and set(decoder.recorded.graphs) == {"greedy"}
                lengths = [len(prompt) for prompt, _, _ in requests + requests[1:3]]
                assert sorted(decoder.prefills.replays) == sorted(f"prefill {prefill_width(n, 64)}" for n in lengths)
    (plain_first, plain_second, plain_seen), *played_runs = runs
    for first, second, seen in played_runs:
        assert first == plain_first and second == plain_second and all(first)
        assert len(seen) == len(plain_seen)
        assert all(torch.equal(a, b) and lengths == plain for (a, lengths), (b, plain) in zip(seen, plain_seen))


def test_a_recorded_prefill_that_fails_beside_the_step_leaves_its_rows_idle(tiny_model):
    """A replay that raises while it is queued beside the step fails its request alone: the row is
    idle again (held 0, not parked) and the running request decodes on."""
    from runtime.decoding.engine import FAILED, Engine

    data = build_static_cache_graph(tiny_model, 64, "fp32").SerializeToString()
    with StaticCacheDecoder(data, 3, "cpu", staged_prefill=True, overlap_prefill=True) as decoder:
        decoder.recorded, decoder.prefills = PlayedSteps(), PlayedSteps()
        decoder._record_prefills()
        engine = Engine(decoder)
        first = engine.submit([1, 2, 3], GenerationSettings(4))
        engine.step()

        def broken(key):
            raise RuntimeError("the replay fell over")

        decoder.prefills.replay = broken
        second = engine.submit([4, 5], GenerationSettings(3))
        events = engine.step()
        assert [(e.finish, e.error) for e in events if e.request == second] == [
            (FAILED, "decoding failed (RuntimeError: the replay fell over)")]
        assert [e.token is not None for e in events if e.request == first] == [True]
        assert decoder.held.tolist() == [4, 0, 0] and not decoder._parked and decoder.lengths == {0: 4}


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded step", "synchronous step"])
def test_a_prefill_beside_the_step_is_launched_after_a_recorded_step_and_before_a_blocking_one(tiny_model, recorded):
    """Beside the step, an admission's recorded prefill is launched once the step's replay is (its
    launch holds the host); a step that blocks the host until it has run (no recorded step, e.g. a
    nucleus row's) launches it first, so the two still overlap. Tokens are those of prefills in line."""
    from runtime.decoding.engine import Engine

    data = build_static_cache_graph(tiny_model, 64, "fp32").SerializeToString()
    requests = [([1 + i, 2 * i + 3, 5] * (1 + i % 3), GenerationSettings(3 + i % 4)) for i in range(6)]
    tokens = []
    for beside in (False, True):
        with StaticCacheDecoder(data, 2, "cpu", staged_prefill=True, overlap_prefill=beside) as decoder:
            order: list[str] = []
            decoder.recorded, decoder.prefills = (PlayedSteps() if recorded else None), PlayedSteps()
            decoder._record_prefills()
            if beside:
                decoder.beside.run = None  # recorded prefills are queued, never run in the side thread
                replay, step = decoder.prefills.replay, decoder.runner.step
                decoder.prefills.replay = lambda key: (order.append("prefill"), replay(key))[1]
                decoder.runner.step = lambda total: (order.append("step"), step(total))[1]
                if recorded:
                    decoder.recorded.replay = (lambda original: lambda key: (order.append("step"), original(key))[1])(
                        decoder.recorded.replay)
            engine = Engine(decoder)
            handles = [engine.submit(prompt, settings) for prompt, settings in requests]
            got, checked = {handle: [] for handle in handles}, 0
            while not engine.idle:
                before = len(order)
                for event in engine.step():
                    got[event.request].append(event.token)
                if beside and "prefill" in order[before:] and "step" in order[before:]:
                    step_order = [name for name in order[before:] if name in ("step", "prefill")]
                    assert step_order[0] == ("step" if recorded else "prefill"), step_order
                    checked += 1
            tokens.append([got[h] for h in handles])
            if beside:
                assert order.count("prefill") == len(requests) and checked >= 2
    assert tokens[0] == tokens[1]


def test_the_runtime_opens_static_graphs_and_never_writes_one_from_weights(tiny_source):
    """Writing the graph is the command's step (runtime.commands.targets): given weights, the
    static-cache backend refuses with the two ways to write one."""
    from runtime.commands.targets import decoder_target
    from runtime.decoding.base import DecodingError
    from runtime.decoding.open import open_decoder

    with pytest.raises(DecodingError, match=r"onnxruntime-static runs a static-cache graph, not weights: write one "
                                            r"first \(export-model --static-cache N"):
        open_decoder(tiny_source, "onnxruntime-static", rows=1, max_cache=32)
    graph = decoder_target(tiny_source, "onnxruntime-static", 32)
    assert isinstance(graph, bytes)
    with open_decoder(graph, "onnxruntime-static", rows=1) as decoder:
        assert decoder.max_cache == 32
    assert decoder_target(tiny_source, "torch", 32) is tiny_source
