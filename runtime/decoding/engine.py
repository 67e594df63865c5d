"""The engine core: the one token loop that `generate`, the benchmark's decode, parity's generation
and the server all run.

It holds the waiting requests, the row table and the admission policy, and `step()` does one round:
admit waiting requests into free rows (prompt tokens up to a per-step budget, so a burst of long
prompts cannot stall running streams for a whole admission), decode one token for every running
row, prefill the admitted rows (beside the decode step where the decoder can: `start_beside`) and
pick their first tokens, and report the tokens as events. Tokens are picked
on the device (`sampling.choose`) and fed back to the decoder there; the step's one device-to-host
copy is the ids it reports. No threads, no I/O, no clocks: a caller drives it (the server from its
decode thread) and decides what to do with the events.

With `overlap`, each step() queues the next step before it reads the ids of the step before, so
the GPU decodes while the host turns ids into events (vLLM's and SGLang's overlapped schedulers
work this way): a request that stops at its end-of-sequence token is stepped once more and that
token dropped (its settings still count for that step's choice of pick: a nucleus row keeps the
PyTorch-ops pick one step longer), and one whose last token is queued leaves the step and frees its
row before it is read.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .base import Decoder, DecodingError
from .row_table import RowTable
from .sampling import GREEDY, OPS, RowSettings, choice_kind, choose
from .settings import GenerationSettings
from .transfer import to_device

PREFILL_TOKENS = 512  # default per-step budget of prompt tokens admitted (one prompt always fits)

LENGTH, STOP, CANCELLED, FAILED = "length", "stop", "cancelled", "failed"  # how a request finishes


@dataclass(frozen=True)
class TokenEvent:
    """One request's news from a step: a token (`index`: its place among the request's new tokens),
    or with `token` None a failure. `finish` is set on the request's last event."""

    request: int  # the handle submit() returned
    token: int | None
    index: int
    finish: str | None = None
    error: str | None = None  # for a failure: what went wrong
    cause: str | None = None  # and the exception's type


@dataclass(eq=False)  # compared and hashed by identity
class _Request:
    handle: int
    prompt: list[int]
    settings: GenerationSettings
    forced: list[int] | None  # teacher forcing: fed instead of the picked tokens (parity)
    produced: int = 0  # tokens reported so far
    queued: int = 0  # tokens whose step is queued: produced, or one more while that step is read later (overlap)
    row: int = -1


@dataclass
class _Queued:
    """A step queued on the device, its ids on their way to the host."""

    reported: list[tuple[_Request, int]]  # each request given a token, and where its id is among the ids
    failed: list[tuple[_Request, str, str]]  # requests the step could not run, message, cause: read after its tokens
    stats: StepStats
    ids: "list[int] | tuple[Tensor, torch.cuda.Event] | None"  # read already (CPU), or a pinned copy and its event


@dataclass
class StepStats:
    """What the last step did, for metrics: rows decoded, requests admitted, prompt tokens prefilled."""

    rows: int = 0
    admitted: int = 0
    prompt_tokens: int = 0
    tokens: int = 0


def check_room(decoder: Decoder, prompt_length: int, settings: GenerationSettings) -> None:
    """A prompt of `prompt_length` plus max_new_tokens must fit in one of the decoder's rows."""
    total = prompt_length + settings.max_new_tokens
    if decoder.max_length is not None and total > decoder.max_length:
        raise DecodingError(f"prompt plus {settings.max_new_tokens} new tokens is {total} tokens, past "
                            f"{decoder.capacity_hint}")


class Engine:
    """In-flight batching over one Decoder: requests join free rows and leave at any step."""

    def __init__(self, decoder: Decoder, rows: int | None = None, prefill_tokens: int = PREFILL_TOKENS,
                 on_logits: Callable[[list[int], Tensor], None] | None = None, overlap: bool = False):
        """`rows`: how many of the decoder's rows to use (default all); `on_logits(handles, logits)`
        sees every (rows, vocab) batch of logits a step gives (parity records them; the pick leaves them as they are).
        `overlap`: each step() queues the next step before it reads the ids of the one before, so that
        the GPU decodes while the host turns ids into events; a step's events then come with the
        next call (the first returns none), and a request that stops at its end-of-sequence token is
        stepped once more, its extra token dropped."""
        if prefill_tokens < 1:
            raise DecodingError(f"the prefill budget must be at least 1 token, got {prefill_tokens}")
        if overlap and on_logits is not None:
            raise DecodingError("on_logits sees each step's logits as the step runs; it needs overlap=False")
        self.decoder, self.prefill_tokens, self.on_logits, self.overlap = decoder, prefill_tokens, on_logits, overlap
        self.rows = min(rows or decoder.rows, decoder.rows)
        # the decoder's rows are the engine's: any a caller left started (decoder.start) are freed,
        # or a request admitted into one would fail (start_beside starts idle rows only), and one
        # past `rows` would still be stepped (every row is) until it was full
        decoder.release(list(decoder.lengths))
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: dict[int, _Request] = {}  # row -> request
        self._by_handle: dict[int, _Request] = {}
        self._free = list(range(self.rows))
        self._next_handle = 0
        self._inputs = torch.zeros(decoder.rows, dtype=torch.int64, device=decoder.device)  # each row's next token
        self._table = RowTable(decoder.rows, decoder.vocab_size, decoder.device)
        self._hosts: list[tuple[Tensor, "torch.cuda.Event"]] = []  # pinned buffers the ids are copied into (CUDA)
        self._queued: _Queued | None = None  # with overlap: the step whose ids the next call reads
        self._picks = {}  # choice kind -> the pick step_and_pick runs on the logits (one object each: a graph key)
        self.stats = StepStats()

    def warm_up(self, settings: GenerationSettings | None = None) -> None:
        """Build what the first requests would otherwise wait for: on CUDA the fused sampling kernel
        is compiled on first use (seconds), and each pick is recorded with the step where the decoder
        records one. `settings`: the only settings to prepare for (default: greedy and sampled ones)."""
        device, vocab = self.decoder.device, self.decoder.vocab_size
        wanted = [settings] if settings is not None else [GenerationSettings(max_new_tokens=1, temperature=1.0)]
        rows = RowSettings.of(wanted, [0], vocab, device)
        kinds = ({choice_kind(device, rows)} | ({GREEDY} if settings is None else set())) - {OPS}
        logits = torch.zeros(1, vocab, device=device)
        for kind in kinds:  # each pick runs once (kernels loaded, compiled), then is recorded with the step
            choose(logits, rows, kind)
        for kind in kinds:
            self.decoder.prepare_pick(self._inputs, self._pick(kind), kind)

    # ---- requests in and out ----
    def check(self, prompt: Sequence[int], settings: GenerationSettings) -> None:
        """Refuse, before any work, a request this decoder cannot serve."""
        settings.check(self.decoder.vocab_size)
        self.decoder.check_prompts({0: list(prompt)})
        check_room(self.decoder, len(prompt), settings)

    def submit(self, prompt: Sequence[int], settings: GenerationSettings, forced: Sequence[int] | None = None) -> int:
        """Queue a request (checked first); returns its handle. `forced`: tokens to feed in place of
        the picked ones (teacher forcing), at least max_new_tokens - 1 of them."""
        self.check(prompt, settings)
        if forced is not None and len(forced) < settings.max_new_tokens - 1:
            raise DecodingError(f"teacher forcing needs {settings.max_new_tokens - 1} tokens, got {len(forced)}")
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        request = _Request(handle, list(prompt), settings, None if forced is None else list(forced))
        self._waiting.append(request)
        self._by_handle[handle] = request
        return handle

    def cancel(self, handle: int) -> bool:
        """Drop a waiting or running request (its row is freed at once). False if it is not here."""
        request = self._by_handle.pop(handle, None)
        if request is None:
            return False
        if request.row < 0:
            self._waiting.remove(request)
        else:
            self._release([request])
        return True

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        return not (self._waiting or self._running or self._queued)

    # ---- one step ----
    def step(self) -> list[TokenEvent]:
        """Admit waiting requests, decode one token for every running row, prefill the admitted
        ones (each gets its first token); return the step's events, running rows first. With
        overlap: queue that step, then return the events of the step queued by the call before."""
        if not self.overlap:
            return self._read(self._queue())
        ahead = self._queue() if self._waiting or any(
            r.queued < r.settings.max_new_tokens for r in self._running.values()) else None
        behind, self._queued = self._queued, ahead
        if behind is None:
            self.stats = StepStats()  # nothing read: this call's step is described when it is
            return []
        return self._read(behind)

    def _queue(self) -> _Queued:
        """Queue a step on the device: the decode of every running row and the admitted rows' prefill
        and first pick, then the copy of their ids to the host."""
        stats = self.stats = StepStats()
        picked: list[Tensor] = []  # device ids: the decode step's (one per decoder row), then the new rows' first
        reported: list[tuple[_Request, int]] = []
        failed: list[tuple[_Request, str, str]] = []
        # a request whose last token is queued already (overlap) is stepped no more: its row is freed now
        self._release([r for r in self._running.values() if r.queued >= r.settings.max_new_tokens], forget=False)
        stepping = [request for _, request in sorted(self._running.items())]
        admitted = self._admit()
        beside = None  # the admitted rows' prefill, running beside the decode step where the decoder can
        if admitted:
            try:
                beside = self.decoder.start_beside({r.row: r.prompt for r in admitted})
            except Exception as error:
                failed, admitted = self._fail(admitted, error), []
        if stepping:
            try:
                picked.append(self._decode(stepping))
                reported += [(request, request.row) for request in stepping]
            except Exception as error:
                failed += self._fail(stepping, error)
        stats.rows = len(reported)
        if admitted:
            try:
                picked.append(self._start(admitted, beside))
                offset = self.decoder.rows if len(picked) > 1 else 0
                reported += [(request, offset + i) for i, request in enumerate(admitted)]
            except Exception as error:
                failed += self._fail(admitted, error)
        ids = None
        if picked:
            ids = self._copy_to_host(torch.cat(picked) if len(picked) > 1 else picked[0])
        for request, _ in reported:
            request.queued += 1
        return _Queued(reported, failed, stats, ids)

    def _read(self, queued: _Queued) -> list[TokenEvent]:
        """A queued step's ids as events; the requests it finished leave."""
        self.stats = queued.stats
        try:
            tokens = [] if queued.ids is None else self._to_host(queued.ids)
        except Exception as error:  # the ids never arrived: the step's requests fail, the engine goes on
            live = [request for request, _ in queued.reported if self._by_handle.get(request.handle) is request]
            queued = _Queued([], queued.failed + self._fail(live, error), queued.stats, None)
            tokens = []
        events, done = [], []
        for request, place in queued.reported:
            if self._by_handle.get(request.handle) is not request:
                continue  # cancelled since, or (overlap) stopped at the step before: its token is dropped
            token, index = tokens[place], request.produced
            request.produced += 1
            finish = None
            if request.settings.eos_id is not None and token == request.settings.eos_id:
                finish = STOP
            elif request.produced >= request.settings.max_new_tokens:
                finish = LENGTH
            events.append(TokenEvent(request.handle, token, index, finish))
            if finish:
                done.append(request)
        self._release(done)
        self.stats.tokens = len(events)
        # failures after the tokens: with overlap, those of the step before come first (a request that
        # stopped there, or was cancelled since, is not failed as well)
        failed = [(r, message, cause) for r, message, cause in queued.failed if self._by_handle.get(r.handle) is r]
        events += [TokenEvent(r.handle, None, r.produced, FAILED, message, cause) for r, message, cause in failed]
        self._release([r for r, _, _ in failed])
        return events

    def _copy_to_host(self, ids: Tensor):
        """The step's one copy to the host, queued: on CUDA into pinned memory (two buffers, as a
        copy may be queued while the one before is not read yet), with an event to wait on."""
        if ids.device.type != "cuda":
            return ids.tolist()
        if not self._hosts or self._hosts[0][0].numel() < ids.numel():
            self._hosts = [(torch.empty(2 * self.decoder.rows, dtype=torch.int64, pin_memory=True), torch.cuda.Event())
                           for _ in range(2)]
        unread = self._queued.ids if self._queued is not None else None  # (overlap) the step not read yet
        unread = unread[0].data_ptr() if isinstance(unread, tuple) else None
        host, copied = next(pair for pair in self._hosts if pair[0].data_ptr() != unread)
        host = host[: ids.numel()]
        host.copy_(ids, non_blocking=True)
        copied.record()
        return host, copied

    @staticmethod
    def _to_host(ids) -> list[int]:
        """The ids _copy_to_host queued, once they are on the host."""
        if isinstance(ids, list):
            return ids
        host, copied = ids
        copied.synchronize()  # without the GIL, unlike tolist() on a CUDA tensor, so the server's senders run
        return host.tolist()

    def _admit(self) -> list[_Request]:
        """Waiting requests for the free rows, first come first served, within the prompt budget."""
        admitted, budget = [], self.prefill_tokens
        while self._waiting and self._free:
            request = self._waiting[0]
            if admitted and len(request.prompt) > budget:
                break
            self._waiting.popleft()
            request.row = self._free.pop(0)
            self._running[request.row] = request
            budget -= len(request.prompt)
            admitted.append(request)
        self.stats.admitted, self.stats.prompt_tokens = len(admitted), self.prefill_tokens - budget
        return admitted

    def _decode(self, stepping: list[_Request]) -> Tensor:
        """One decoder step over every row, in place (an idle row's pick is never read), and the
        pick of every row's next token (one CUDA graph with the step where the decoder records one);
        the ids of every row."""
        kind = choice_kind(self.decoder.device, self._table.settings)
        logits, ids = self.decoder.step_and_pick(self._inputs, self._pick(kind), None if kind == OPS else kind)
        if self.on_logits is not None:  # the pick left the logits as they were
            rows = to_device([r.row for r in stepping], torch.int64, self.decoder.device)
            self.on_logits([r.handle for r in stepping], logits.index_select(0, rows))
        self._force(stepping)
        return ids

    def _pick(self, kind: str) -> Callable[[Tensor], Tensor]:
        """The device work on a step's logits for choice `kind`: every row's id, fed back as its next
        input. The same object each time (a recorded graph's key), reading the row table's tensors."""
        if kind not in self._picks:
            settings, inputs = self._table.settings, self._inputs  # not self: a recorded graph holds its pick

            def pick(logits: Tensor) -> Tensor:
                ids = choose(logits, settings, None if kind == OPS else kind)
                inputs.copy_(ids)
                return ids

            self._picks[kind] = pick
        return self._picks[kind]

    def _start(self, admitted: list[_Request], beside: Callable[[], Tensor] | None) -> Tensor:
        """Prefill the admitted requests' rows (or complete the prefill begun `beside` the step) and
        pick their first tokens; their ids, in order."""
        logits = beside() if beside is not None else self.decoder.start({r.row: r.prompt for r in admitted})
        settings = [r.settings for r in admitted]
        fresh = RowSettings.of(settings, [0] * len(admitted), self.decoder.vocab_size, self.decoder.device)
        if self.on_logits is not None:
            self.on_logits([r.handle for r in admitted], logits)
        ids = choose(logits, fresh)
        rows = [r.row for r in admitted]
        index = to_device(rows, torch.int64, self.decoder.device)
        self._inputs.index_copy_(0, index, ids)
        self._force(admitted)
        self._table.join(rows, index, fresh, settings)
        return ids

    def _force(self, requests: list[_Request]) -> None:
        """Teacher forcing: after new token i, feed forced[i] in place of the picked one."""
        forced = [(r.row, r.forced[r.queued]) for r in requests if r.forced is not None and r.queued < len(r.forced)]
        if forced:  # index_copy_: a Python number set into one element of a CUDA tensor waits for the GPU
            rows, tokens = zip(*forced)
            device = self.decoder.device
            self._inputs.index_copy_(0, to_device(rows, torch.int64, device), to_device(tokens, torch.int64, device))

    def _release(self, requests: list[_Request], forget: bool = True) -> None:
        """Free the requests' rows; `forget`: they are done (a request whose last token is still to
        be read keeps its handle until then)."""
        rows = [r.row for r in requests if self._running.get(r.row) is r]
        for request in requests:
            if self._running.get(request.row) is request:
                del self._running[request.row]
            if forget:
                self._by_handle.pop(request.handle, None)
        if rows:
            self.decoder.release(rows)
            self._table.leave(rows)
            self._free = sorted(self._free + rows)

    def _fail(self, requests: list[_Request], error: Exception) -> list[tuple[_Request, str, str]]:
        """A decoder failure ends the requests involved, never the engine: their rows are freed now,
        and they are reported failed when the step is read."""
        message = f"decoding failed ({type(error).__name__}: {error})"
        self._release(requests, forget=False)
        return [(r, message, type(error).__name__) for r in requests]
