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
