"""SidePrefill's queued work (recorded prefills beside the step): queued when the caller completes
it, after the caller's step, not when it is begun; a failure surfaces at that call."""
import pytest

from runtime.decoding.side_prefill import SidePrefill


class Runner:
    closed = False

    def close(self):
        self.closed = True


def test_queued_work_runs_at_the_wait_after_what_the_caller_queued_meanwhile():
    side = SidePrefill(False, lambda stream: Runner())
    calls = []
    wait = side.queue(lambda: calls.append("prefill"))
    calls.append("step")  # the caller queues its step between beginning and completing the start
    assert calls == ["step"]
    wait()
    assert calls == ["step", "prefill"]

    def broken():
        raise RuntimeError("the replay fell over")

    wait = side.queue(broken)
    with pytest.raises(RuntimeError, match="the replay fell over"):
        wait()
    runner = side.runner
    side.close()
    assert runner.closed


def test_launch_queued_runs_pending_work_once_and_a_closed_side_refuses_it():
    side = SidePrefill(False, lambda stream: Runner())
    calls = []
    first = side.queue(lambda: calls.append("first"))
    second = side.queue(lambda: calls.append("second"))
    side.launch_queued()  # a step that blocks the host launches what is queued first
    calls.append("step")
    first()
    second()
    first()  # a second wait queues nothing again
    assert calls == ["first", "second", "step"]
    late = side.queue(lambda: calls.append("late"))
    side.close()
    with pytest.raises(RuntimeError, match="closed before its work was queued"):
        late()
    assert calls == ["first", "second", "step"]
