"""The in-flight batching scheduler without a server: real tiny decoders, fake streams."""
from __future__ import annotations

import random
import time

import pytest
import torch

from serving_helpers import FakeStream, mixed_requests
from runtime.decoding.generation import GenerationSettings
from runtime.decoding.open import open_decoder
from runtime.serving.limits import Limits
from runtime.serving.requests import GenerateRequest
from runtime.serving.scheduler import Scheduler

WAIT_S = 30  # every wait is bounded


def typed(prompt, settings) -> GenerateRequest:
    return GenerateRequest(prompt, settings, False)


def wait_all(streams) -> None:
    deadline = time.monotonic() + WAIT_S
    for stream in streams:
        assert stream.done.wait(max(deadline - time.monotonic(), 0.01)), "a request never finished"


def scheduler_over(decoder, limits: Limits, overlap: bool, monkeypatch, **options) -> Scheduler:
    """A scheduler over `decoder`; with `overlap` its engine runs the overlapped loop, as the server
    does where a decoder's steps are queued (CUDA graphs), the decoder's steps taken as queued while
    the engine is made (offline `generate`, the reference, keeps the plain loop)."""
    from runtime.decoding.static_cache import StaticCacheDecoder

    with monkeypatch.context() as patch:
        if overlap:
            patch.setattr(StaticCacheDecoder, "queues_steps", property(lambda self: True))
        scheduler = Scheduler(decoder, limits, **options)
    assert scheduler._loop_thread._args[1].overlap == overlap  # the engine the decode thread steps
    return scheduler


@pytest.mark.parametrize("graph, overlap", [("tiny_static_onnx", False), ("tiny_past_onnx", False),
                                            ("tiny_static_onnx", True)])
def test_rows_joining_and_leaving_give_each_request_its_offline_tokens(request, graph, overlap, offline_tokens,
                                                                       monkeypatch):
    """40 requests arrive at random moments into 4 rows: each row is started, stepped and released at
    its own position with its own settings, and its tokens equal offline generate of it alone; also
    with the engine's steps overlapped, as the server runs them where a decoder's steps are queued."""
    target = request.getfixturevalue(graph)
    work = mixed_requests(40, seed=1, max_prompt=20, max_new=40)
    rng = random.Random(2)
    with open_decoder(target, "onnxruntime", rows=4) as decoder:
        scheduler = scheduler_over(decoder, Limits(max_rows=4, max_queue=64), overlap, monkeypatch).start()
        streams = []
        for prompt, settings in work:
            streams.append(FakeStream())
            scheduler.submit(typed(prompt, settings), streams[-1])
            time.sleep(rng.choice([0.0, 0.0, 0.002]))
        wait_all(streams)
        assert scheduler.close(5)
    for (prompt, settings), stream in zip(work, streams):
        assert stream.error is None and stream.tokens == offline_tokens(target, prompt, settings)
    assert scheduler.metrics.requests["completed"] == 40
    assert scheduler.metrics.tokens_total == sum(len(s.tokens) for s in streams)


@pytest.mark.parametrize("rows, queue", [(1, 2), (2, 0)])
def test_a_full_queue_refuses_at_once_and_the_rest_are_served(tiny_static_onnx, rows, queue):
    """A request is refused as busy only when every row is taken and --queue requests wait: the
    free rows' requests never count against the queue, and --queue 0 means no waiting at all."""
    with open_decoder(tiny_static_onnx, "onnxruntime", rows=rows) as decoder:
        scheduler = Scheduler(decoder, Limits(max_rows=rows, max_queue=queue))
        streams = [FakeStream() for _ in range(rows + queue + 1)]
        for stream in streams:  # not started yet: the free rows' requests, then the queue's, then one too many
            scheduler.submit(typed([1, 2], GenerationSettings(4)), stream)
        assert [s.done.is_set() for s in streams] == [False] * (rows + queue) + [True]
        assert f"the server is busy: every row is taken and {queue} requests already wait" in streams[-1].error
        scheduler.start()
        wait_all(streams[:-1])
        assert scheduler.close(5)
    assert [len(s.tokens) for s in streams[:-1]] == [4] * (rows + queue)
    assert scheduler.metrics.requests == {"completed": rows + queue, "cancelled": 0, "rejected": 1, "failed": 0}


@pytest.mark.parametrize("overlap", [False, True])
def test_a_client_that_goes_away_frees_its_row_for_the_next(tiny_static_onnx, overlap, monkeypatch):
    with open_decoder(tiny_static_onnx, "onnxruntime", rows=1) as decoder:
        scheduler = scheduler_over(decoder, Limits(max_rows=1), overlap, monkeypatch,
                                   cancel_check_s=0.0).start()  # ask every step
        gone, after = FakeStream(cancel_after=3), FakeStream()
        scheduler.submit(typed([5], GenerationSettings(80)), gone)
        scheduler.submit(typed([6], GenerationSettings(5)), after)
        wait_all([gone, after])
        assert scheduler.close(5)
        assert decoder.active == []
    assert gone.ended and gone.error is None and 3 <= len(gone.tokens) < 80
    assert len(after.tokens) == 5
    assert scheduler.metrics.requests["cancelled"] == 1 and scheduler.metrics.active == 0


class SlowSteps:
    """A decoder whose every step takes at least `seconds`, so that what a test does while requests
    run happens before they end, on a loaded machine too (the tiny model decodes 90 tokens in a few
    milliseconds, which a descheduled test thread can miss)."""

    def __init__(self, decoder, seconds: float = 0.002):
        self.decoder, self.seconds = decoder, seconds

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def step_and_pick(self, tokens: torch.Tensor, pick, key=None):  # the engine's step
        time.sleep(self.seconds)
        return self.decoder.step_and_pick(tokens, pick, key)


class FailingOnce:
    """A decoder whose next step raises once (a backend failure mid-batch)."""

    def __init__(self, decoder):
        self.decoder, self.fail_next = decoder, False

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def step_and_pick(self, tokens: torch.Tensor, pick, key=None):  # the engine's step
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        return self.decoder.step_and_pick(tokens, pick, key)


def test_a_decoder_failure_fails_those_rows_only_and_serving_goes_on(tiny_static_onnx):
    messages = []
    with open_decoder(tiny_static_onnx, "onnxruntime", rows=2) as inner:
        decoder = FailingOnce(inner)
        scheduler = Scheduler(decoder, Limits(max_rows=2), log=messages.append)
        first = FakeStream()
        scheduler.submit(typed([1], GenerationSettings(10)), first)
        decoder.fail_next = True
        scheduler.start()
        wait_all([first])
        later = FakeStream()
        scheduler.submit(typed([2], GenerationSettings(3)), later)
        wait_all([later])
        assert scheduler.close(5)
    assert first.error == "decoding failed on the server (RuntimeError); retry the request"
    assert len(later.tokens) == 3 and later.error is None
    assert messages and "device lost" in messages[0]


def test_close_drains_active_requests_then_refuses_new_ones(tiny_static_onnx):
    with open_decoder(tiny_static_onnx, "onnxruntime", rows=2) as decoder:
        scheduler = Scheduler(decoder, Limits(max_rows=2)).start()
        streams = [FakeStream() for _ in range(4)]
        for stream in streams:
            scheduler.submit(typed([3, 4], GenerationSettings(30)), stream)
        assert scheduler.close(WAIT_S)  # returns once all four finished
        late = FakeStream()
        scheduler.submit(typed([1], GenerationSettings(2)), late)
    assert all(len(s.tokens) == 30 and s.error is None for s in streams)
    assert late.error == "the server is shutting down; retry on another server"


def test_a_drain_that_times_out_fails_what_is_left(tiny_static_onnx):
    with open_decoder(tiny_static_onnx, "onnxruntime", rows=1) as decoder:
        scheduler = Scheduler(SlowSteps(decoder), Limits(max_rows=1))
        active, waiting = FakeStream(), FakeStream()
        scheduler.submit(typed([3], GenerationSettings(90)), active)
        scheduler.submit(typed([4], GenerationSettings(5)), waiting)
        scheduler.start()
        assert not scheduler.close(0.0)  # no time to drain: at most one step runs
        assert decoder.active == []
    message = "the server shut down before this request finished; retry it"
    assert active.error == message and len(active.tokens) < 90 and waiting.error == message
    assert scheduler.metrics.requests["failed"] == 2


def test_a_stopped_decode_loop_fails_its_requests_with_the_retry_message(tiny_static_onnx):
    """What SIGTERM does in the decode process once serve's drain is over: every request the loop
    holds, and any that still arrives, ends FAILED with the retry message; the loop ends when its
    driver leaves."""
    import threading
    from multiprocessing import Pipe

    from runtime.decoding.engine import FAILED, Engine
    from runtime.serving.decode_loop import SHUTDOWN, serve_engine, settings_fields

    ours, theirs = Pipe()
    stopping = threading.Event()
    with open_decoder(tiny_static_onnx, "onnxruntime", rows=2) as decoder:
        loop = threading.Thread(target=serve_engine, args=(theirs, Engine(decoder, rows=2), None, stopping))
        ours.send(("submit", 7, [3, 4], settings_fields(GenerationSettings(90)), None))
        loop.start()
        assert ours.poll(WAIT_S) and ours.recv()[0] == "events"  # decoding
        stopping.set()
        ours.send(("submit", 8, [5], settings_fields(GenerationSettings(5)), None))
        failed = []
        while len(failed) < 2 and ours.poll(WAIT_S):
            failed += [event for event in ours.recv()[1] if event[2] == FAILED]
        ours.send(("close", 0.0))
        while ours.poll(WAIT_S) and (message := ours.recv())[0] != "closed":
            pass
        loop.join(WAIT_S)
    assert sorted(failed) == [(7, None, FAILED, SHUTDOWN, None), (8, None, FAILED, SHUTDOWN, None)]
    assert message == ("closed", []) and not loop.is_alive()


class RefusingStream(FakeStream):
    """Triton refuses responses once the client has gone: send raises after `after` responses."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def send(self, tokens: list[int], final: bool) -> None:
        if len(self.responses) >= self.after:
            if final:  # the request ran to its end before its cancellation reached the loop
                self.done.set()
            raise RuntimeError("the request has been cancelled")
        super().send(tokens, final)


def test_a_refused_response_frees_the_row_and_counts_as_cancelled(tiny_static_onnx):
    with open_decoder(tiny_static_onnx, "onnxruntime", rows=1) as decoder:
        scheduler = Scheduler(SlowSteps(decoder), Limits(max_rows=1), cancel_check_s=0.0).start()
        refused, after = RefusingStream(after=2), FakeStream()
        scheduler.submit(typed([5], GenerationSettings(40)), refused)
        scheduler.submit(typed([6], GenerationSettings(4)), after)
        wait_all([refused, after])  # `refused` ends with an (also refused) final response
        assert scheduler.close(5) and decoder.active == []
    # two responses got through; the rest were refused, whether or not the request reached its end first
    assert len(refused.responses) == 2 and len(after.tokens) == 4
    assert scheduler.metrics.requests == {"completed": 1, "cancelled": 1, "rejected": 0, "failed": 0}
    assert scheduler.metrics.steps > 0 and scheduler.metrics.step_rows >= scheduler.metrics.steps
    assert scheduler.metrics.admit_step_seconds <= scheduler.metrics.step_seconds


def test_closing_a_scheduler_that_never_started_fails_what_it_holds(tiny_static_onnx):
    with open_decoder(tiny_static_onnx, "onnxruntime", rows=1) as decoder:
        scheduler = Scheduler(decoder, Limits(max_rows=1, max_queue=4))
        waiting = FakeStream()
        scheduler.submit(typed([2, 3], GenerationSettings(50)), waiting)
        scheduler.close(0.0)
        assert decoder.active == []
    assert waiting.done.is_set() and waiting.error is not None


def test_the_decode_process_prefills_beside_the_step_by_default_only_where_a_second_copy_fits(tmp_path, monkeypatch):
    """ROTARY_OVERLAP_PREFILL decides when set; by default a graph whose files (external data
    included) take under an eighth of the GPU's free memory is prefilled beside the step, a larger
    one and anything off CUDA in line."""
    from runtime.serving.decode_loop import prefills_beside

    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"x" * 100)
    (tmp_path / "model.onnx.data").write_bytes(b"x" * 900)
    (tmp_path / "other.onnx").write_bytes(b"x" * 10**6)
    monkeypatch.setenv("ROTARY_OVERLAP_PREFILL", "1")
    assert prefills_beside(str(graph))
    monkeypatch.setenv("ROTARY_OVERLAP_PREFILL", "0")
    assert not prefills_beside(str(graph))
    monkeypatch.delenv("ROTARY_OVERLAP_PREFILL")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not prefills_beside(str(graph))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for free, beside in ((8001, True), (8000, False)):  # 1,000 bytes of graph: beside below an eighth of the free memory
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda free=free: (free, 10**12))
        assert prefills_beside(str(graph)) is beside
    assert not prefills_beside(str(tmp_path / "missing.onnx"))


def test_a_cancel_key_cancels_another_drivers_request_and_one_sent_early_waits_for_its_request(tiny_static_onnx):
    """Two instances of generate share one loop: a client's cancel request (its key only) may reach
    the other instance, and may come before the request it names. Either way that request ends
    CANCELLED, reported to the driver that submitted it, and the other request goes on."""
    import threading
    from multiprocessing import Pipe

    from runtime.decoding.engine import CANCELLED, Engine
    from runtime.serving.decode_loop import serve_engine, settings_fields

    (first, first_far), (second, second_far), (wake, _) = Pipe(), Pipe(), Pipe(duplex=False)

    class Arrivals:  # the second instance's driver connects once the loop runs
        def __init__(self):
            self.wake, self.pending = wake, [second_far]

        def take(self):
            taken, self.pending = self.pending, []
            return taken

    with open_decoder(tiny_static_onnx, "onnxruntime", rows=2) as decoder:
        loop = threading.Thread(target=serve_engine, args=(first_far, Engine(decoder, rows=2), Arrivals()))
        first.send(("submit", 1, [3, 4], settings_fields(GenerationSettings(90)), "key-of-one"))
        first.send(("submit", 2, [5], settings_fields(GenerationSettings(90)), None))
        loop.start()
        assert first.poll(WAIT_S) and first.recv()[0] == "events"  # both decoding
        second.send(("cancel_key", "key-of-one"))  # through the other instance
        second.send(("cancel_key", "key-of-three"))  # before its request
        first.send(("submit", 3, [6], settings_fields(GenerationSettings(90)), "key-of-three"))
        ended, tokens_of_two = {}, 0
        while len(ended) < 2 and first.poll(WAIT_S):
            for request, token, finish, _, _ in first.recv()[1]:
                if finish is not None:
                    ended[request] = finish
                tokens_of_two += request == 2 and token is not None
        for driver in (first, second):
            driver.send(("close", 0.0))
            while driver.poll(WAIT_S) and driver.recv()[0] != "closed":
                pass
        loop.join(WAIT_S)
    assert ended == {1: CANCELLED, 3: CANCELLED} and 0 < tokens_of_two < 90 and not loop.is_alive()


def test_a_cancel_key_in_use_is_refused_and_keys_of_ended_requests_cancel_nothing_running(tiny_static_onnx):
    """A second running request may not take a key in use; a key whose request was cancelled by id,
    or has finished, cancels nothing that runs (it waits, as an early key, for a request that never
    comes) and the loop goes on."""
    import threading
    from multiprocessing import Pipe

    from runtime.decoding.engine import CANCELLED, FAILED, Engine
    from runtime.serving.decode_loop import serve_engine, settings_fields

    ours, theirs = Pipe()
    with open_decoder(tiny_static_onnx, "onnxruntime", rows=2) as decoder:
        loop = threading.Thread(target=serve_engine, args=(theirs, Engine(decoder, rows=2)))
        ours.send(("submit", 1, [3], settings_fields(GenerationSettings(90)), "key-of-one-0123"))
        ours.send(("submit", 2, [4], settings_fields(GenerationSettings(90)), "key-of-one-0123"))
        ours.send(("submit", 3, [5], settings_fields(GenerationSettings(2)), "key-of-three-01"))
        loop.start()
        events = []
        while not any(e[0] == 3 and e[2] is not None for e in events) and ours.poll(WAIT_S):
            events += ours.recv()[1]
        ours.send(("cancel", 1))
        ours.send(("cancel_key", "key-of-one-0123"))  # its request was cancelled by id
        ours.send(("cancel_key", "key-of-three-01"))  # its request has finished
        ours.send(("submit", 4, [6], settings_fields(GenerationSettings(3)), None))
        while not any(e[0] == 4 and e[2] is not None for e in events) and ours.poll(WAIT_S):
            events += ours.recv()[1]
        ours.send(("close", 0.0))
        while ours.poll(WAIT_S) and ours.recv()[0] != "closed":
            pass
        loop.join(WAIT_S)
    ends = {request: (finish, error) for request, _, finish, error, _ in events if finish is not None}
    assert ends[2] == (FAILED, "cancel_key is in use by a running request; send a new random key")
    assert ends[1] == (CANCELLED, None) and ends[3][0] != CANCELLED and ends[4][0] != CANCELLED
    assert sum(1 for e in events if e[0] == 4 and e[1] is not None) == 3 and not loop.is_alive()


def test_a_decode_process_that_has_bound_but_not_yet_listens_is_waited_for(monkeypatch, tmp_path):
    """Its socket file appears at bind, a moment before listen: a connection then is refused, and
    serve once failed to start on it. Refusals are retried while the process runs; a process that
    has exited, or a deadline passed, ends the wait."""
    from runtime.serving import scheduler

    class Process:
        def __init__(self, exited):
            self.exited = exited

        def poll(self):
            return 1 if self.exited else None

    attempts = []

    def client(address, authkey):
        attempts.append(address)
        if len(attempts) < 3:
            raise ConnectionRefusedError
        return "connection"

    monkeypatch.setattr(scheduler, "Client", client)
    (tmp_path / "key").write_bytes(b"k")
    later = time.monotonic() + 60
    assert scheduler._connect_started(tmp_path / "loop.sock", tmp_path / "key", Process(False), later) == "connection"
    assert len(attempts) == 3
    attempts.clear()
    assert scheduler._connect_started(tmp_path / "loop.sock", tmp_path / "key", Process(True), later) is None
    assert len(attempts) == 1
    attempts.clear()
    assert scheduler._connect_started(tmp_path / "loop.sock", tmp_path / "key", Process(False), 0.0) is None
