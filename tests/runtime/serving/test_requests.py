"""Request checks: every bad input refused in one sentence naming the input; good ones typed."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.serving.limits import Limits, LimitsError
from runtime.serving.requests import RequestError, parse_request

LIMITS = Limits(max_rows=2, max_prompt_tokens=8, max_new_tokens=16, max_queue=4, default_new_tokens=5)


def ids(*values, dtype=np.int64):
    return np.array(values, dtype=dtype)


def test_a_text_prompt_and_every_setting():
    request = parse_request({"prompt": np.array([b"Hi"], dtype=object), "max_new_tokens": ids(3, dtype=np.int32),
                             "temperature": np.array([0.7], np.float32), "filter_thres": np.array([0.5], np.float32),
                             "seed": ids(-4), "eos_id": ids(10)}, 256, LIMITS, capacity=96)
    assert request.prompt == [72, 105] and request.text
    s = request.settings
    assert (s.max_new_tokens, s.seed, s.eos_id, s.filter_thres) == (3, -4, 10, 0.5)
    assert s.temperature == pytest.approx(0.7)


def test_defaults_come_from_the_limits_and_generate():
    request = parse_request({"prompt_ids": ids(1, 2, 3)}, 256, LIMITS)
    assert request.prompt == [1, 2, 3] and not request.text
    assert (request.settings.max_new_tokens, request.settings.temperature, request.settings.seed) == (5, 0.0, 0)


@pytest.mark.parametrize("arrays, message", [
    ({}, "give exactly one of prompt \\(text\\) or prompt_ids"),
    ({"prompt": np.array([b"a"], object), "prompt_ids": ids(1)}, "give exactly one of prompt"),
    ({"prompt": np.array([b""], object)}, "the prompt is empty"),
    ({"prompt": np.array([b"\xff"], object)}, "prompt is not valid UTF-8"),
    ({"prompt_ids": ids()}, "prompt_ids is empty"),
    ({"prompt_ids": ids(1, 256)}, "prompt_ids holds 256, outside the vocabulary 0..255"),
    ({"prompt_ids": ids(-1)}, "prompt_ids holds -1, outside the vocabulary"),
    ({"prompt_ids": np.array([1.5])}, "prompt_ids must be integers"),
    ({"prompt_ids": ids(*range(9))}, "the prompt has 9 tokens, over this server's limit of 8"),
    ({"prompt_ids": ids(1), "max_new_tokens": ids(17)}, "max_new_tokens must be between 1 and this server's limit of 16"),
    ({"prompt_ids": ids(1), "max_new_tokens": ids(0)}, "max_new_tokens must be between 1"),
    ({"prompt_ids": ids(1), "max_new_tokens": ids(2, 3)}, "max_new_tokens must be one number, got 2 values"),
    ({"prompt_ids": ids(1), "max_new_tokens": np.array([2.0])}, "max_new_tokens must be an integer"),
    ({"prompt_ids": ids(1), "temperature": np.array([np.nan], np.float32)}, "temperature must be a finite number"),
    ({"prompt_ids": ids(1), "filter_thres": np.array([1.0], np.float32)}, "filter_thres must be in \\[0, 1\\)"),
    ({"prompt_ids": ids(1), "eos_id": ids(300)}, "eos_id 300 is outside the vocabulary 0..255"),
    ({"prompt_ids": ids(1), "stop": ids(1)}, "unknown input 'stop'"),
    ({"prompt_ids": ids(*range(8)), "max_new_tokens": ids(16)}, "over the model's capacity of 20 tokens"),
])
def test_bad_requests_are_refused_in_one_sentence(arrays, message):
    with pytest.raises(RequestError, match=message) as caught:
        parse_request(arrays, 256, LIMITS, capacity=20)
    assert "\n" not in str(caught.value)


def test_text_needs_a_byte_vocabulary():
    with pytest.raises(RequestError, match="text prompts need a vocabulary of at least 256 tokens"):
        parse_request({"prompt": np.array([b"a"], object)}, 64, LIMITS)


def test_limits_round_trip_through_parameters_and_refuse_nonsense():
    assert Limits.from_parameters(LIMITS.to_parameters()) == LIMITS
    assert Limits.from_parameters({"max_rows": "3"}).replace(max_queue=0) == Limits(max_rows=3, max_queue=0)
    with pytest.raises(LimitsError, match="--max-rows .max_rows. must be an integer from 1 to 4096, got 0"):
        Limits(max_rows=0)
    with pytest.raises(LimitsError, match="parameter max_queue must be an integer"):
        Limits.from_parameters({"max_queue": "many"})
    with pytest.raises(LimitsError, match="--max-prompt-tokens .max_prompt_tokens. 256 leaves no room for new tokens in the cache"):
        Limits().check_capacity(96, "the cache")


def test_the_names_tritons_llm_clients_send():
    """text_input / max_tokens / stream as Triton's vLLM and TensorRT-LLM models take them, with
    top_k and top_p: answered in text_output."""
    request = parse_request({"text_input": np.array([b"Hi"], object), "max_tokens": ids(4, dtype=np.int32),
                             "stream": np.array([False]), "top_k": ids(7, dtype=np.int32),
                             "top_p": np.array([0.9], np.float32)}, 256, LIMITS)
    assert request.prompt == [72, 105] and request.text and request.text_output and not request.stream
    assert (request.settings.max_new_tokens, request.settings.top_k) == (4, 7)
    assert request.settings.top_p == pytest.approx(0.9)
    plain = parse_request({"prompt_ids": ids(1)}, 256, LIMITS)
    assert plain.stream and not plain.text_output and (plain.settings.top_k, plain.settings.top_p) == (0, 1.0)
    # as in those models, a text_input request streams only when asked
    assert not parse_request({"text_input": np.array([b"Hi"], object)}, 256, LIMITS).stream
    assert parse_request({"text_input": np.array([b"Hi"], object), "stream": np.array([True])}, 256, LIMITS).stream


@pytest.mark.parametrize("arrays, message", [
    ({"text_input": np.array([b"a"], object), "prompt": np.array([b"a"], object)},
     "give exactly one of prompt .*; got prompt and text_input"),
    ({"text_input": np.array([b""], object)}, "the prompt is empty"),
    ({"prompt_ids": ids(1), "max_tokens": ids(2, dtype=np.int32), "max_new_tokens": ids(2, dtype=np.int32)},
     "give max_new_tokens or max_tokens, not both"),
    ({"prompt_ids": ids(1), "top_k": ids(-1, dtype=np.int32)}, "top_k must be 0 \\(no limit\\) or a positive count"),
    ({"prompt_ids": ids(1), "top_p": np.array([0.0], np.float32)}, "top_p must be in \\(0, 1\\], got 0.0"),
    ({"prompt_ids": ids(1), "top_p": np.array([1.5], np.float32)}, "top_p must be in \\(0, 1\\]"),
    ({"prompt_ids": ids(1), "stream": ids(1)}, "stream must be true or false"),
])
def test_bad_llm_convention_inputs_are_refused(arrays, message):
    with pytest.raises(RequestError, match=message):
        parse_request(arrays, 256, LIMITS)


def test_limits_not_given_fit_a_small_capacity_and_given_ones_are_kept():
    from runtime.serving.limits import Limits

    base = Limits()
    assert base.fitted(96, set()) == base.replace(max_prompt_tokens=48, max_new_tokens=48)
    assert base.fitted(4096, set()) == base  # the defaults fit
    assert base.fitted(None, set()) == base  # unbounded
    kept = base.replace(max_prompt_tokens=80).fitted(96, {"max_prompt_tokens"})
    assert (kept.max_prompt_tokens, kept.max_new_tokens) == (80, 16)
    with pytest.raises(LimitsError, match="--max-prompt-tokens .max_prompt_tokens. 256 leaves no room for new tokens "
                                          "in the decoder's 96-token capacity; lower it below 96"):
        base.replace(max_prompt_tokens=256).fitted(96, {"max_prompt_tokens"})
    with pytest.raises(LimitsError, match="--max-new-tokens-limit .max_new_tokens. 100 can never be reached .a prompt "
                                          "takes at least one token. in the decoder's 64-token capacity; lower it below 64"):
        base.replace(max_new_tokens=100).fitted(64, {"max_new_tokens"})
    assert base.replace(max_new_tokens=63).fitted(64, {"max_new_tokens"}).max_prompt_tokens == 32  # reachable
