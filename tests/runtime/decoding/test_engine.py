"""The engine core with a fake decoder: admission, the prefill budget, release, cancellation,
failures and teacher forcing, deterministically (no threads, no clocks)."""
from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from runtime.decoding.base import Decoder, DecodingError
from runtime.decoding.engine import CANCELLED, FAILED, LENGTH, STOP, Engine
from runtime.decoding.generation import generate
from runtime.decoding.settings import GenerationSettings

VOCAB = 16


def fake_logits(tokens: list[int]) -> torch.Tensor:
    """The next-token logits of a row holding `tokens`: a clear favourite that depends on the last
    token and the length, and a spread the sampler can draw from."""
    logits = torch.linspace(0.0, 1.0, VOCAB)
    logits[(tokens[-1] * 3 + len(tokens)) % VOCAB] = 4.0
    return logits


class FakeDecoder(Decoder):
    """Rows hold their tokens on the host; every call is recorded."""

    def __init__(self, rows: int, max_length: int = 64, fail_step: int | None = None):
        super().__init__("fake", "cpu", ModelConfig(num_tokens=VOCAB, dim=8, depth=1, heads=1, dim_head=8), rows,
                         max_length, f"the fake's {max_length}-token rows")
        self.held: dict[int, list[int]] = {}
        self.calls: list[tuple] = []
        self.fail_step = fail_step

    def _start(self, prompts, all_logits):
        self.calls.append(("start", sorted(prompts)))
        self.held.update({row: list(prompt) for row, prompt in prompts.items()})
        return torch.stack([fake_logits(self.held[row]) for row in prompts])

    def _step(self, tokens):
        self.calls.append(("step", self.active, tokens.tolist()))
        if self.fail_step is not None and sum(call[0] == "step" for call in self.calls) == self.fail_step:
            raise RuntimeError("the device fell over")
        for row, token in zip(self.active, tokens.tolist()):
            self.held[row].append(token)
        return torch.stack([fake_logits(self.held[row]) for row in self.active])

    def _release(self, rows):
        self.calls.append(("release", sorted(rows)))
        for row in rows:
            del self.held[row]


def expected_greedy(prompt: list[int], new_tokens: int, eos_id: int | None = None) -> list[int]:
    tokens, held = [], list(prompt)
    for _ in range(new_tokens):
        token = int(fake_logits(held).argmax())
        tokens.append(token)
        held.append(token)
        if token == eos_id:
            break
    return tokens


def run(engine: Engine, limit: int = 200) -> tuple[dict[int, list[int]], dict[int, str], list[list]]:
    """Step until idle: tokens and finish per handle, and each step's events."""
    tokens, finish, steps = {}, {}, []
    for _ in range(limit):
        if engine.idle:
            return tokens, finish, steps
        events = engine.step()
        steps.append(events)
        for event in events:
            if event.token is not None:
                assert event.index == len(tokens.setdefault(event.request, []))
                tokens[event.request].append(event.token)
            if event.finish:
                finish[event.request] = event.finish
    raise AssertionError("the engine never went idle")


def test_more_requests_than_rows_queue_and_each_gets_its_own_tokens():
    decoder = FakeDecoder(rows=2)
    engine = Engine(decoder)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11]]
    handles = [engine.submit(p, GenerationSettings(max_new_tokens=3 + i)) for i, p in enumerate(prompts)]
    assert engine.waiting == 5 and engine.running == 0
    tokens, finish, steps = run(engine)
    assert [tokens[h] for h in handles] == [expected_greedy(p, 3 + i) for i, p in enumerate(prompts)]
    assert set(finish.values()) == {LENGTH}
    assert max(len(events) for events in steps) == 2  # never more rows than the decoder has
    assert decoder.lengths == {} and decoder.held == {} and engine.idle


def test_admission_keeps_to_the_prompt_budget_and_running_rows_keep_decoding():
    decoder = FakeDecoder(rows=4)
    engine = Engine(decoder, prefill_tokens=10)
    first = engine.submit([1] * 3, GenerationSettings(max_new_tokens=20))
    engine.step()  # the first request runs
    late = [engine.submit([2] * 8, GenerationSettings(max_new_tokens=4)) for _ in range(3)]
    per_step = []
    for _ in range(3):
        events = engine.step()
        per_step.append(sorted(e.request for e in events if e.index == 0))
        assert first in [e.request for e in events]  # the running stream gets a token every step
        assert engine.stats.prompt_tokens <= 10
    assert per_step == [[late[0]], [late[1]], [late[2]]]  # 8 + 8 > 10: one long prompt per step
    assert [call[1] for call in decoder.calls if call[0] == "start"] == [[0], [1], [2], [3]]


def test_a_prompt_longer_than_the_budget_is_still_admitted_alone():
    engine = Engine(FakeDecoder(rows=2), prefill_tokens=4)
    handle = engine.submit(list(range(12)), GenerationSettings(max_new_tokens=2))
    tokens, _, _ = run(engine)
    assert tokens[handle] == expected_greedy(list(range(12)), 2)


def test_finished_rows_are_released_in_the_step_that_ends_them_and_reused():
    decoder = FakeDecoder(rows=1)
    engine = Engine(decoder)
    free = expected_greedy([3, 1], 10)
    eos = free[2]
    stopped = engine.submit([3, 1], GenerationSettings(max_new_tokens=10, eos_id=eos))
    single = engine.submit([5], GenerationSettings(max_new_tokens=1))
    tokens, finish, steps = run(engine)
    assert tokens[stopped] == free[:3] and finish[stopped] == STOP
    assert tokens[single] == expected_greedy([5], 1) and finish[single] == LENGTH
    assert ("release", [0]) in decoder.calls and decoder.lengths == {}
    assert len(steps) == 4  # three tokens for the first request, then one admission step for the second
    assert sum(call[0] == "step" for call in decoder.calls) == 2  # a one-token request is never stepped


def test_cancelling_a_waiting_and_a_running_request_frees_them_at_once():
    decoder = FakeDecoder(rows=1)
    engine = Engine(decoder)
    running = engine.submit([1, 2], GenerationSettings(max_new_tokens=50))
    waiting = engine.submit([3], GenerationSettings(max_new_tokens=2))
    engine.step()
    assert engine.cancel(waiting) and engine.waiting == 0
    assert engine.cancel(running) and engine.running == 0 and decoder.lengths == {}
    assert not engine.cancel(running) and not engine.cancel(999)
    assert engine.idle and engine.step() == []
    again = engine.submit([4], GenerationSettings(max_new_tokens=2))
    tokens, _, _ = run(engine)
    assert tokens[again] == expected_greedy([4], 2)
    assert CANCELLED == "cancelled"


def test_a_decoder_failure_fails_the_rows_involved_and_the_engine_goes_on():
    decoder = FakeDecoder(rows=2, fail_step=2)
    engine = Engine(decoder)
    a = engine.submit([1], GenerationSettings(max_new_tokens=5))
    b = engine.submit([2], GenerationSettings(max_new_tokens=5))
    engine.step()
    engine.step()
    events = engine.step()  # the decoder's second step raises
    assert {(e.request, e.finish) for e in events} == {(a, FAILED), (b, FAILED)}
    assert all(e.token is None and "the device fell over" in e.error for e in events)
    assert engine.idle and decoder.lengths == {}
    after = engine.submit([3], GenerationSettings(max_new_tokens=3))
    tokens, _, _ = run(engine)
    assert tokens[after] == expected_greedy([3], 3)


def test_sampled_requests_draw_the_same_tokens_alone_and_next_to_others():
    settings = [GenerationSettings(12, 1.5, 0.0, seed=1), GenerationSettings(5, 1.5, 0.0, seed=2, top_p=0.7),
                GenerationSettings(9, 1.5, 0.0, seed=3, top_k=4), GenerationSettings(7, 0.0, seed=4)]
    alone = []
    for setting in settings:
        engine = Engine(FakeDecoder(rows=1))
        handle = engine.submit([9, 4], setting)
        alone.append(run(engine)[0][handle])
    # joined one per step into 3 rows, leaving at their own lengths (the nucleus row first), the
    # last one taking a freed row: other rows, other steps, other neighbours
    engine = Engine(FakeDecoder(rows=3), prefill_tokens=2)
    handles = [engine.submit([9, 4], setting) for setting in settings]
    together = run(engine)[0]
    assert [together[h] for h in handles] == alone
    assert len({tuple(tokens[:5]) for tokens in alone}) == 4  # the seeds matter


def test_teacher_forcing_feeds_the_forced_tokens_and_reports_the_picked_ones():
    decoder = FakeDecoder(rows=1)
    seen = []
    engine = Engine(decoder, on_logits=lambda handles, logits: seen.append(logits.clone()))
    forced = [7, 7, 7]
    handle = engine.submit([1], GenerationSettings(max_new_tokens=4), forced=forced)
    tokens, _, _ = run(engine)
    assert [call[2] for call in decoder.calls if call[0] == "step"] == [[7], [7], [7]]
    assert tokens[handle] == [int(fake_logits([1] + forced[:i]).argmax()) for i in range(4)]
    assert len(seen) == 4 and torch.equal(seen[2][0], fake_logits([1, 7, 7]))


@pytest.mark.parametrize("prompt, settings, forced, message", [
    ([VOCAB], GenerationSettings(2), None, f"prompt token id {VOCAB} is out of range"),
    ([1] * 60, GenerationSettings(8), None, "prompt plus 8 new tokens is 68 tokens, past the fake's 64-token rows"),
    ([1], GenerationSettings(2, eos_id=VOCAB), None, f"--eos-id {VOCAB} is outside the vocabulary"),
    ([1], GenerationSettings(4), [1], "teacher forcing needs 3 tokens, got 1"),
    ([1], GenerationSettings(4, top_k=-2), None, "--top-k must be 0 \\(off\\) or a positive count, got -2"),
    ([1], GenerationSettings(4, top_p=0.0), None, "--top-p must be in \\(0, 1\\], got 0.0"),
])
def test_bad_requests_are_refused_at_submit(prompt, settings, forced, message):
    engine = Engine(FakeDecoder(rows=1))
    with pytest.raises(DecodingError, match=message):
        engine.submit(prompt, settings, forced)
    assert engine.idle


def test_warming_up_leaves_the_engine_as_it_was():
    engine = Engine(FakeDecoder(rows=1))
    engine.warm_up()
    handle = engine.submit([2], GenerationSettings(max_new_tokens=3))
    assert run(engine)[0][handle] == expected_greedy([2], 3)


def test_a_step_whose_decode_fails_still_starts_the_requests_it_admitted():
    decoder = FakeDecoder(rows=2, fail_step=1)
    engine = Engine(decoder, prefill_tokens=1)  # one admission per step: the second joins as the first steps
    first = engine.submit([1], GenerationSettings(max_new_tokens=5))
    engine.step()
    second = engine.submit([4, 2], GenerationSettings(max_new_tokens=3))
    events = engine.step()  # the decoder's first step raises; the admission in the same step goes on
    assert [(e.request, e.finish) for e in events if e.finish == FAILED] == [(first, FAILED)]
    assert [(e.request, e.token) for e in events if e.token is not None] == [(second, expected_greedy([4, 2], 1)[0])]
    later = [e.token for _ in range(10) for e in engine.step()]
    assert [events[0].token] + later == expected_greedy([4, 2], 3) and engine.idle


class BesideFails(FakeDecoder):
    """A decoder that offers prefills beside the step and cannot begin one for a prompt holding 9."""

    def _start_beside(self, prompts):
        if any(9 in prompt for prompt in prompts.values()):
            raise RuntimeError("no side stream")
        return None  # the others prefill in line


def test_a_prefill_that_cannot_begin_fails_its_requests_and_the_running_rows_go_on():
    decoder = BesideFails(rows=2)
    engine = Engine(decoder)
    running = engine.submit([3], GenerationSettings(max_new_tokens=4))
    got = [e.token for e in engine.step()]
    bad = engine.submit([9], GenerationSettings(max_new_tokens=4))
    events = engine.step()
    assert [(e.request, e.finish) for e in events if e.token is None] == [(bad, FAILED)]
    assert "no side stream" in [e.error for e in events if e.token is None][0]
    assert [e.request for e in events if e.token is not None] == [running]
    later = [e.token for _ in range(10) for e in engine.step()]
    assert got + [events[0].token] + later == expected_greedy([3], 4)
    assert decoder.lengths == {} and engine.idle


class Recording(FakeDecoder):
    """Plays a decoder that records step_and_pick as a graph: what was recorded at prepare_pick is
    what every later step of that key runs, so a pick that was not the recorded one, or tokens at
    another address, would replay stale work."""

    def __init__(self, rows: int):
        super().__init__(rows)
        self.recorded: dict[str, tuple] = {}
        self.keys: list[str | None] = []

    def prepare_pick(self, tokens, pick, key):
        self.recorded[key] = (tokens.data_ptr(), pick)
        return True

    def step_and_pick(self, tokens, pick, key=None):
        self.keys.append(key)
        if key is None:
            return super().step_and_pick(tokens, pick, key)
        address, recorded = self.recorded[key]
        assert (address, recorded) == (tokens.data_ptr(), pick)
        logits = self.step_every_row(tokens)
        return logits, recorded(logits)


def test_the_engine_records_one_pick_per_choice_and_keeps_its_buffers():
    decoder = Recording(rows=2)
    engine = Engine(decoder, prefill_tokens=2)
    engine.warm_up()
    assert set(decoder.recorded) == {"greedy"}  # on the CPU a sampled batch takes PyTorch ops: not recorded
    greedy = engine.submit([5], GenerationSettings(6))
    sampled = engine.submit([5, 1], GenerationSettings(3, 1.0, 0.0, seed=3))
    tokens, _, _ = run(engine)
    assert tokens[greedy] == expected_greedy([5], 6)
    # greedy alone, then next to the sampled row (a choice by PyTorch ops) while it lasts, then alone
    assert decoder.keys == ["greedy", None, None, "greedy", "greedy"]
    assert tokens[sampled] == run_alone([5, 1], GenerationSettings(3, 1.0, 0.0, seed=3))


def test_warming_up_for_given_settings_prepares_their_pick_alone():
    decoder = Recording(rows=1)
    Engine(decoder).warm_up(GenerationSettings(4, 1.0, seed=1))
    assert decoder.recorded == {}  # on the CPU a sampled row takes PyTorch ops: nothing to record
    Engine(decoder).warm_up(GenerationSettings(4))
    assert set(decoder.recorded) == {"greedy"}


def test_generate_records_the_pick_before_its_first_step():
    """Overlapped, a first decode step run unrecorded would be queued (and, on ONNX Runtime, waited
    for) before the first tokens are read, inside the time to the first token."""
    decoder = Recording(rows=1)
    result = generate(decoder, [[5]], GenerationSettings(4))
    assert result.tokens == [expected_greedy([5], 4)] and decoder.keys == ["greedy"] * 3


def run_alone(prompt: list[int], settings: GenerationSettings) -> list[int]:
    engine = Engine(FakeDecoder(rows=1))
    handle = engine.submit(prompt, settings)
    return run(engine)[0][handle]


@pytest.mark.parametrize("rows", [None, 2])
def test_rows_a_caller_left_started_are_the_engines_to_start_again(rows):
    """Also a row past the engine's `rows`: it would be stepped with the others until full."""
    decoder = FakeDecoder(rows=3, max_length=8)
    decoder.start({0: [1, 1], 1: [2], 2: [5] * 5})  # e.g. a benchmark's time-to-first-token measurement
    engine = Engine(decoder, rows=rows)
    assert decoder.lengths == {} and ("release", [0, 1, 2]) in decoder.calls
    handles = [engine.submit([3], GenerationSettings(4)), engine.submit([4, 4], GenerationSettings(2))]
    tokens, finish, _ = run(engine)
    assert [tokens[h] for h in handles] == [expected_greedy([3], 4), expected_greedy([4, 4], 2)]
    assert set(finish.values()) == {LENGTH}


# ---- overlap: the next step queued before the ids of the one before are read ----
def mixed_workload(engine: Engine) -> list[int]:
    """Greedy and sampled requests, one stopping at an end-of-sequence token, one teacher-forced,
    more than the rows hold, admitted within a small budget."""
    eos = expected_greedy([5, 6], 9)[3]  # its fourth token: it stops there
    work = [([9, 4], GenerationSettings(12, 1.5, 0.0, seed=1), None),
            ([5, 6], GenerationSettings(9, eos_id=eos), None),
            ([3], GenerationSettings(6, 1.2, 0.0, seed=2, top_k=4), None),
            ([1], GenerationSettings(4), [7, 3, 5]),
            ([2, 2, 2], GenerationSettings(7), None),
            ([8], GenerationSettings(5, 0.9, 0.0, seed=3, top_p=0.8), None)]
    return [engine.submit(prompt, settings, forced) for prompt, settings, forced in work]


def test_overlapped_steps_give_every_request_the_same_tokens_and_finishes():
    plain = Engine(FakeDecoder(rows=3), prefill_tokens=3)
    want_handles = mixed_workload(plain)
    want_tokens, want_finish, _ = run(plain)
    overlapped = Engine(FakeDecoder(rows=3), prefill_tokens=3, overlap=True)
    handles = mixed_workload(overlapped)
    tokens, finish, steps = run(overlapped)
    assert [tokens[h] for h in handles] == [want_tokens[h] for h in want_handles]
    assert [finish[h] for h in handles] == [want_finish[h] for h in want_handles]
    assert finish[handles[1]] == STOP and len(tokens[handles[1]]) == 4
    assert steps[0] == [] and overlapped.idle and not overlapped.decoder.lengths and overlapped._free == [0, 1, 2]


def test_with_overlap_a_stopped_request_is_stepped_once_more_and_its_extra_token_dropped():
    decoder = FakeDecoder(rows=1, max_length=8)
    engine = Engine(decoder, overlap=True)
    eos = expected_greedy([5, 6], 6)[1]
    handle = engine.submit([5, 6], GenerationSettings(6, eos_id=eos))
    tokens, finish, _ = run(engine)
    assert tokens[handle] == expected_greedy([5, 6], 6, eos_id=eos) and finish[handle] == STOP
    # steps: the one after the first token (it gave the end-of-sequence token), then one the engine
    # queued before it read that token
    assert [call[0] for call in decoder.calls] == ["start", "step", "step", "release"]


def test_with_overlap_a_request_that_ends_by_length_is_never_stepped_past_its_room():
    decoder = FakeDecoder(rows=2, max_length=8)  # both fill their rows exactly: one more step would not fit
    engine = Engine(decoder, overlap=True)
    short, long = engine.submit([1, 2], GenerationSettings(6)), engine.submit([3], GenerationSettings(7))
    tokens, finish, _ = run(engine)
    assert tokens[short] == expected_greedy([1, 2], 6) and tokens[long] == expected_greedy([3], 7)
    assert finish == {short: LENGTH, long: LENGTH}
    # row 0 (short) is stepped for its tokens 1..5, then freed while row 1 takes its last step
    assert [call[1] for call in decoder.calls if call[0] == "step"] == [[0, 1]] * 5 + [[1]]


def test_with_overlap_a_request_cancelled_while_its_step_is_queued_reports_nothing_more():
    engine = Engine(FakeDecoder(rows=1), overlap=True)
    first = engine.submit([1], GenerationSettings(10))
    assert engine.step() == []  # its admission is queued
    events = engine.step()  # the next step queued, the admission's token read
    assert [(e.request, e.index) for e in events] == [(first, 0)]
    assert engine.cancel(first)
    second = engine.submit([2], GenerationSettings(2))
    tokens, finish, _ = run(engine)
    assert first not in tokens and tokens[second] == expected_greedy([2], 2) and finish[second] == LENGTH


def outcome(engine: Engine, handles: list[int]) -> list[tuple]:
    """Per request: its tokens, how it finished and the error, stepping until idle."""
    events = [event for step in run(engine)[2] for event in step]
    return [([e.token for e in events if e.request == h and e.token is not None],
             [(e.index, e.finish, e.error) for e in events if e.request == h and e.finish]) for h in handles]


@pytest.mark.parametrize("fail_step", [1, 2, 4])
def test_with_overlap_a_failed_step_still_reports_the_tokens_before_it(fail_step):
    """The same events as the plain loop when the decoder fails: tokens of the step before the
    failure first, then the failure at the next index; a request that stopped at its end-of-sequence
    token before the failing step (only overlap steps it again) finishes stopped, not failed."""
    eos = expected_greedy([5, 6], 9)[1]
    work = [([1], GenerationSettings(6)), ([5, 6], GenerationSettings(9, eos_id=eos)), ([3], GenerationSettings(5))]

    def events(overlap: bool):
        engine = Engine(FakeDecoder(rows=3, fail_step=fail_step), overlap=overlap)
        return outcome(engine, [engine.submit(prompt, settings) for prompt, settings in work])

    plain = events(False)
    assert events(True) == plain
    assert any(finish and finish[0][1] == FAILED for _, finish in plain)


def test_with_overlap_a_request_cancelled_after_its_step_failed_is_not_reported_failed():
    engine = Engine(FakeDecoder(rows=1, fail_step=1), overlap=True)
    handle = engine.submit([1], GenerationSettings(5))
    assert engine.step() == []  # the admission queued
    assert [(e.index, e.finish) for e in engine.step()] == [(0, None)]  # the failing step queued, the admission read
    assert engine.cancel(handle)
    assert engine.step() == [] and engine.idle


def fails_at(function, call: int, message: str):
    """`function`, except that its `call`-th call raises RuntimeError(message)."""
    calls = []

    def wrapped(*args):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(message)
        return function(*args)

    return wrapped


def test_a_copy_to_the_host_that_fails_once_leaves_no_request_behind():
    engine = Engine(FakeDecoder(rows=1))
    handle = engine.submit([1, 2], GenerationSettings(4))
    first = engine.step()
    engine._copy_to_host = fails_at(engine._copy_to_host, 1, "the copy fell over")
    with pytest.raises(RuntimeError, match="the copy fell over"):
        engine.step()  # its decode ran, its token is lost with the copy: the step is taken again
    events = first + [event for _ in range(5) for event in engine.step()]
    assert [(e.index, e.finish) for e in events] == [(0, None), (1, None), (2, None), (3, LENGTH)]
    assert all(e.request == handle for e in events) and engine.idle and not engine._by_handle


def test_overlap_refuses_on_logits():
    with pytest.raises(DecodingError, match="on_logits sees each step's logits as the step runs; it needs overlap=False"):
        Engine(FakeDecoder(rows=1), on_logits=lambda handles, logits: None, overlap=True)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_ids_that_never_reach_the_host_fail_their_requests_and_the_engine_goes_on(overlap):
    """A read of a step's ids that raises (the device fell over) ends that step's requests failed,
    with the cause; the engine frees their rows and serves the next request (overlapped, the step
    queued behind that read is dropped with its requests)."""
    engine = Engine(FakeDecoder(rows=2), overlap=overlap)
    handles = [engine.submit([1], GenerationSettings(6)), engine.submit([2, 3], GenerationSettings(6))]
    engine._to_host = fails_at(engine._to_host, 3, "an illegal memory access was encountered")
    tokens, finish, steps = run(engine)
    failed = [e for step in steps for e in step if e.finish == FAILED]
    assert [(e.request, e.index, e.cause) for e in failed] == [(handles[0], 2, "RuntimeError"), (handles[1], 2, "RuntimeError")]
    assert all("an illegal memory access was encountered" in e.error for e in failed)
    assert [tokens[h] for h in handles] == [expected_greedy([1], 2), expected_greedy([2, 3], 2)]
    assert engine.idle and engine._free == [0, 1] and not engine.decoder.lengths and not engine._by_handle
    after = engine.submit([4], GenerationSettings(3))
    assert run(engine)[0][after] == expected_greedy([4], 3)
