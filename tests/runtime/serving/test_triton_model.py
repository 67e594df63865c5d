"""The python-backend side of `generate` with a fake pb_utils: every request handed to it counts as
an open stream until it is completed, once, whichever way; finalize says so before it drains."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.serving.limits import Limits
from runtime.serving.metrics import ServingMetrics
from runtime.serving.triton_model import GenerateModel, TritonStream


class FakePb:
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors, error

    class TritonError:
        def __init__(self, message):
            self.message = message


class Sender:
    def __init__(self, refuse: bool = False):
        self.refuse, self.sent, self.responses = refuse, [], []

    def send(self, response=None, flags=0):
        if self.refuse and response is not None:
            raise RuntimeError("the client cancelled")
        self.sent.append(flags)
        self.responses.append(response)

    def is_cancelled(self):
        return self.refuse


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class Request:
    def __init__(self, sender, **inputs):
        self.sender, self.inputs_ = sender, [Tensor(k, np.array(v)) for k, v in inputs.items()]

    def get_response_sender(self):
        return self.sender

    def inputs(self):
        return self.inputs_


def _model() -> tuple[GenerateModel, list]:
    model = object.__new__(GenerateModel)
    submitted: list = []
    model.pb, model.metrics, model.limits = FakePb, ServingMetrics(), Limits()
    model.facts = {"vocab_size": 256, "max_length": 64}
    model.scheduler = type("Scheduler", (), {"submit": lambda self, parsed, stream: submitted.append(stream)})()
    return model, submitted


def test_a_stream_is_completed_once_by_its_final_response():
    closed = []
    stream = TritonStream(FakePb, Sender(), text=False, on_final=lambda: closed.append(1))
    assert stream.send([1, 2], final=False) and closed == []
    assert stream.send([3], final=True) and closed == [1]
    assert stream.send([4], final=True) is False and stream.end() is False and closed == [1]
    assert stream.cancelled()


def test_a_cancelled_request_that_asked_for_one_response_still_gets_it():
    """stream false (one response with every token): ended early, it sends the tokens held so far
    as that one response, as Triton's non-streaming endpoint needs exactly one; a streamed request
    gets the bare final flag."""
    whole, streamed = Sender(), Sender()
    stream = TritonStream(FakePb, whole, text=False, stream=False)
    assert stream.send([1, 2], final=False) and whole.sent == []
    assert stream.end() and whole.sent == [FakePb.TRITONSERVER_RESPONSE_COMPLETE_FINAL]
    assert whole.responses[0].output_tensors[0].array.tolist() == [1, 2]
    assert TritonStream(FakePb, streamed, text=False).end() and streamed.responses == [None]


def test_a_refused_final_response_still_completes_the_stream_once():
    closed, sender = [], Sender(refuse=True)
    stream = TritonStream(FakePb, sender, text=False, on_final=lambda: closed.append(1))
    with pytest.raises(RuntimeError, match="cancelled"):
        stream.send([1], final=True)
    assert closed == [1] and sender.sent == [FakePb.TRITONSERVER_RESPONSE_COMPLETE_FINAL]  # the bare final flag


def test_every_request_is_an_open_stream_until_its_final_response():
    model, submitted = _model()
    model.submit(Request(Sender(), prompt_ids=[1, 2, 3], max_new_tokens=[4]))
    model.submit(Request(Sender(), prompt_ids=[1, 2, 3], max_new_tokens=[4]))
    assert model.metrics.open_streams == 2 and len(submitted) == 2
    submitted[0].send([7], final=True)
    assert model.metrics.open_streams == 1
    refused = Sender()
    model.submit(Request(refused, prompt_ids=[999]))  # out of the vocabulary: refused at once
    assert refused.sent == [FakePb.TRITONSERVER_RESPONSE_COMPLETE_FINAL] and model.metrics.open_streams == 1
    submitted[1].fail("decoding failed")
    assert model.metrics.open_streams == 0


def test_finalize_says_the_instance_is_being_finalized_before_it_drains():
    model, _ = _model()
    seen = []
    model.scheduler = type("Scheduler", (), {"close": lambda self, timeout: seen.append(model.metrics.unloading)})()
    model.close()
    assert seen == [1]
