"""The scheduler's token emission against offline `generate`, over a decoder whose logits hash each
row's whole history (no graph to export, so it runs in a second): any token fed to or sent for the
wrong row, dropped, repeated or sampled with another row's settings changes what a stream receives.
Found missing by the mutation pass (scripts/mutation_pass.py)."""
from __future__ import annotations

import threading
import time

import torch

from runtime.decoding.base import Decoder
from runtime.decoding.generation import GenerationSettings, generate
from runtime.decoding.sampling import RowSettings, choose
from runtime.serving.limits import Limits
from runtime.serving.metrics import ServingMetrics
from runtime.serving.requests import GenerateRequest
from runtime.serving.responder import Responder
from runtime.serving.scheduler import Scheduler
from models.presets import preset
from serving_helpers import FakeStream

VOCAB = 64
CONFIG = preset("tiny").replace(num_tokens=VOCAB)


class HistoryDecoder(Decoder):
    """Logits of a row = 3 * N(0, 1) seeded by the row's tokens so far: a function of its history only."""

    def __init__(self, rows: int):
        super().__init__("history", "cpu", CONFIG, rows, None, "unbounded")
        self.history: dict[int, list[int]] = {}

    @staticmethod
    def logits_of(tokens: list[int]) -> torch.Tensor:
        seed = 0
        for token in tokens:
            seed = (seed * 1_000_003 + token + 1) % (2**61 - 1)
        return 3.0 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))

    def _start(self, prompts, all_logits):
        for row, prompt in prompts.items():
            self.history[row] = list(prompt)
        return torch.stack([self.logits_of(self.history[row]) for row in prompts])

    def _step(self, tokens):
        for row, token in zip(self.active, tokens.tolist()):
            self.history[row].append(int(token))
        return torch.stack([self.logits_of(self.history[row]) for row in self.active])

    def _release(self, rows):
        for row in rows:
            self.history.pop(row, None)


def offline(prompt: list[int], settings: GenerationSettings) -> list[int]:
    with HistoryDecoder(1) as decoder:
        return generate(decoder, [prompt], settings).tokens[0]


REQUESTS = [  # admitted together: greedy and sampled rows with different temperatures, seeds and lengths
    ([1, 2, 3], GenerationSettings(12, 0.0, 0.9, seed=1)),
    ([4, 5], GenerationSettings(9, 0.3, 0.5, seed=2)),
    ([6], GenerationSettings(14, 3.0, 0.5, seed=3)),
    ([7, 8, 9, 10], GenerationSettings(7, 1.0, 0.5, seed=4)),
    ([11, 12], GenerationSettings(10, 0.7, 0.0, seed=5)),
    ([13], GenerationSettings(1, 1.0, 0.5, seed=6)),
]


def serve(requests, rows: int) -> tuple[Scheduler, list[FakeStream]]:
    with HistoryDecoder(rows) as decoder:
        scheduler = Scheduler(decoder, Limits(max_rows=rows, max_queue=64), senders=3)
        streams = [FakeStream() for _ in requests]
        for (prompt, settings), stream in zip(requests, streams):  # queued before start: admitted together
            scheduler.submit(GenerateRequest(prompt, settings, False), stream)
        scheduler.start()
        deadline = time.monotonic() + 30
        for stream in streams:
            assert stream.done.wait(max(deadline - time.monotonic(), 0.01)), "a request never finished"
        assert scheduler.close(5) and decoder.active == []
    return scheduler, streams


def test_rows_admitted_together_stream_exactly_their_offline_tokens():
    expected = [offline(prompt, settings) for prompt, settings in REQUESTS]
    assert len({tuple(tokens) for tokens in expected}) == len(expected)
    scheduler, streams = serve(REQUESTS, rows=4)  # 6 requests, 4 rows: two join as others leave
    for (prompt, settings), stream, want in zip(REQUESTS, streams, expected):
        assert stream.error is None
        assert stream.tokens == want, f"prompt {prompt}"
        assert stream.finals[-1] and not any(stream.finals[:-1])  # one final response, the last
        assert all(stream.responses)  # every response carries at least one token
        assert len(want) == settings.max_new_tokens
    assert scheduler.metrics.tokens_total == sum(len(s.tokens) for s in streams)
    assert scheduler.metrics.requests["completed"] == len(REQUESTS)


def test_each_row_of_a_batched_choice_keeps_its_own_temperature():
    """Rows of one kept count in one batched choice: a cold and a hot row over the same logits draw
    what each draws alone (a temperature shared across the group turns the hot rows cold)."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5]]).expand(40, -1)
    settings = [GenerationSettings(4, 0.05 if row % 2 else 4.0, 0.0, seed=row) for row in range(40)]
    alone = [int(choose(logits[row:row + 1], RowSettings.of([s], [0], 8, logits.device))[0])
             for row, s in enumerate(settings)]
    assert choose(logits, RowSettings.of(settings, [0] * 40, 8, logits.device)).tolist() == alone
    assert len(set(alone[0::2])) > 3 and set(alone[1::2]) == {0}  # hot rows spread, cold rows greedy


class GatedStream:
    """Records each response as its send begins, then holds the sender until the test lets it go:
    the test decides which tokens are pending when (no clocks)."""

    def __init__(self):
        self.responses: list[list[int]] = []
        self.finals: list[bool] = []
        self.entered = threading.Semaphore(0)
        self.permits = threading.Semaphore(0)

    def send(self, tokens: list[int], final: bool) -> None:
        self.responses.append(list(tokens))
        self.finals.append(final)
        self.entered.release()
        assert self.permits.acquire(timeout=30)

    def fail(self, message: str) -> None:
        raise AssertionError(message)

    def end(self) -> None:
        raise AssertionError("ended")

    def cancelled(self) -> bool:
        return False


def test_a_behind_senders_pending_tokens_travel_together_in_order_and_only_the_last_is_final():
    """Tokens that arrive while a stream's send is under way wait in its outbox and go out together,
    in order, in its next response; the final flag rides on the response with the last token.
    Found missing by the mutation pass (respond-coalesced-*, emit-final-token-replaced)."""
    metrics = ServingMetrics()
    responder = Responder(metrics, senders=1)
    stream = GatedStream()
    try:
        responder.tokens([(stream, 10, None)])
        assert stream.entered.acquire(timeout=30)  # the first send is under way: [10]
        responder.tokens([(stream, 11, None)])
        responder.tokens([(stream, 12, None)])
        stream.permits.release()
        assert stream.entered.acquire(timeout=30)  # [11, 12], taken together
        responder.tokens([(stream, 13, None)])
        responder.tokens([(stream, 14, "completed")])
        stream.permits.release()
        assert stream.entered.acquire(timeout=30)  # [13, 14], the last response
        stream.permits.release()
    finally:
        stream.permits.release(5)
        responder.close(30)
    assert stream.responses == [[10], [11, 12], [13, 14]]
    assert stream.finals == [False, False, True]
    assert metrics.requests["completed"] == 1
