"""The benchmark's decode timing: every timed step decodes every row, or the measurement fails."""
import pytest
import torch

from models.config import ModelConfig
from runtime.bench.measure import decode_steps
from runtime.decoding.base import Decoder, DecodingError

VOCAB = 8


class Counting(Decoder):
    """Every row's logits are zeros; steps are counted, and can be made to fail."""

    def __init__(self, rows: int, fail: bool = False):
        super().__init__("counting", "cpu", ModelConfig(num_tokens=VOCAB, dim=8, depth=1, heads=1, dim_head=8), rows,
                         None, "unbounded rows")
        self.steps, self.fail = 0, fail

    def _start(self, prompts, all_logits):
        if all_logits:
            return [torch.zeros(len(prompt), VOCAB) for prompt in prompts.values()]
        return torch.zeros(len(prompts), VOCAB)

    def _step(self, tokens):
        self.steps += 1
        if self.fail:
            raise RuntimeError("the device fell over")
        return torch.zeros(len(tokens), VOCAB)

    def _release(self, rows):
        pass


PROMPTS = {0: [1, 2], 1: [3], 2: [4, 5, 6]}


def test_decode_steps_decode_every_row_after_the_prefill_measurements_left_rows_started():
    decoder = Counting(3)
    decoder.start(PROMPTS)  # what the time-to-first-token measurement leaves behind
    times = decode_steps(decoder, PROMPTS, warmup=2, new_tokens=5)
    assert len(times) == 5 and decoder.steps == 7 and not decoder.lengths


def test_steps_that_decode_nothing_are_refused_not_timed():
    with pytest.raises(DecodingError, match=r"decode step 1 gave 0 of 3 tokens \(decoding failed \(RuntimeError: "
                                            r"the device fell over\)\)"):
        decode_steps(Counting(3, fail=True), PROMPTS, warmup=1, new_tokens=4)


def test_decode_steps_with_overlap_time_every_step_of_every_row():
    decoder = Counting(3)
    times = decode_steps(decoder, PROMPTS, warmup=2, new_tokens=5, overlap=True)
    # the admission, then 1 + 2 + 5 calls that each queue a decode step behind the one they read (so
    # the last timed call, too, reads while the device has a step to run), and none past that
    assert len(times) == 5 and decoder.steps == 8 and not decoder.lengths


def test_a_decoder_whose_steps_block_is_measured_in_the_plain_loop(tiny_static_onnx):
    """measure() overlaps only where the decoder's steps are queued: on the CPU each step blocks, so
    the overlapped loop would hand each token out a step late for nothing."""
    from models.precision import precision
    from runtime.bench.measure import measure
    from runtime.decoding.open import open_decoder

    with open_decoder(tiny_static_onnx, "onnxruntime", rows=2) as decoder:
        assert not decoder.queues_steps
        result = measure(decoder, 8, 3, 1, 1, precision("fp32"), None)
    assert result.decode_loop == "plain" and result.decode_p50_ms > 0
    assert not Counting(1).queues_steps


def test_a_static_cache_sized_by_cache_positions_holds_the_overlapped_run_and_not_one_token_less(tiny_model):
    """benchmark sizes static caches with cache_positions(); the overlapped loop queues one step past
    the last timed one, which a cache a token smaller refuses (on the H200 at 7b both static backends
    skipped the cell: '1061 tokens, past the 1060-token static cache')."""
    from runtime.bench.measure import cache_positions
    from runtime.decoding.torch_static import TorchStaticDecoder

    prompts = {0: list(range(1, 9))}
    size = cache_positions(8, warmup=2, new_tokens=3)
    assert size == 8 + 1 + 2 + 3 + 1
    decoder = TorchStaticDecoder(tiny_model, 1, size, "cpu", compile=False)
    assert len(decode_steps(decoder, prompts, warmup=2, new_tokens=3, overlap=True)) == 3
    smaller = TorchStaticDecoder(tiny_model, 1, size - 1, "cpu", compile=False)
    with pytest.raises(DecodingError, match=f"past the {size - 1}-token static cache"):
        decode_steps(smaller, prompts, warmup=2, new_tokens=3, overlap=True)
