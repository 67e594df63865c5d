"""The Decoder contract: drive a model token by token for up to `rows` independent rows.

`start({row: prompt})` (re)starts rows from their prompts, `step(tokens)` appends one token to
every active row and returns the next-token logits, `release(rows)` frees rows. Rows sit at
their own positions and can join or leave between steps, which is what a server's in-flight
batching needs; `generate` and the benchmark use the same three calls.
"""
from __future__ import annotations

import abc
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from models.config import ModelConfig

from .captured_step import CapturedSteps
from .errors import DecodingError
from .transfer import to_device


def check_token_ids(prompt: Sequence[int], vocab_size: int) -> None:
    """Every id of a non-empty prompt is in the vocabulary."""
    low, high = min(prompt), max(prompt)
    if low < 0 or high >= vocab_size:
        raise DecodingError(f"prompt token id {low if low < 0 else high} is out of range; the vocabulary is "
                            f"0..{vocab_size - 1}")


class Decoder(abc.ABC):
    """Base class: checks every call once, so implementations only fill in `_start`, `_step`, `_release`."""

    def __init__(self, name: str, device: torch.device | str, config: ModelConfig, rows: int,
                 max_length: int | None, capacity_hint: str):
        if rows < 1:
            raise DecodingError(f"a decoder needs at least one row, got {rows}")
        self.name, self.device, self.config, self.rows = name, torch.device(device), config, rows
        self.max_length = max_length  # tokens one row can hold (prompt + generated); None: unbounded
        self.capacity_hint = capacity_hint  # what max_length is, for error messages
        self.lengths: dict[int, int] = {}  # active row -> tokens it holds
        self.closed = False
        self.owner = None  # what was opened for this decoder alone (runtime.decoding.open), closed with it
        self.mode = "cache"  # how it decodes, for humans
        self._index: tuple[tuple[int, ...], Tensor | None] = ((), None)  # the active rows and their device index
        self._starting: set[int] = set()  # rows whose start_beside() is not completed yet
        self.recorded: CapturedSteps | None = None  # the step and the caller's pick as CUDA graphs, where recorded

    @property
    def vocab_size(self) -> int:
        return self.config.num_tokens

    @property
    def queues_steps(self) -> bool:
        """Whether a step returns once it is queued on the device, before it has run (PyTorch's
        CUDA kernels, a recorded CUDA graph). Only then does the engine's overlapped loop gain
        anything: a step that blocks until done would only hand each token out one step later."""
        return self.device.type == "cuda"

    @property
    def active(self) -> list[int]:
        """Active rows, in the order `step` takes tokens and returns logits."""
        return sorted(self.lengths)

    def start(self, prompts: Mapping[int, Sequence[int]], all_logits: bool = False) -> Tensor | list[Tensor]:
        """(Re)start the given rows from their prompts. Returns each row's next-token logits as one
        (len(prompts), vocab) tensor in the order of `prompts`, or with `all_logits` a list of
        (prompt length, vocab) tensors: the logits at every prompt position."""
        self._check_open()
        prompts = {row: list(prompt) for row, prompt in prompts.items()}
        self.check_prompts(prompts)
        result = self._start(prompts, all_logits)
        self.lengths.update({row: len(prompt) for row, prompt in prompts.items()})
        return result

    def start_beside(self, prompts: Mapping[int, Sequence[int]]) -> Callable[[], Tensor] | None:
        """Begin starting idle rows so that their prefill runs beside the next step: returns the call
        that completes the start once that step is queued (it returns what start() returns; the rows
        are active from then on, idle until then), or None where this decoder prefills in line (then
        call start())."""
        self._check_open()
        prompts = {row: list(prompt) for row, prompt in prompts.items()}
        self.check_prompts(prompts)
        busy = sorted(set(prompts) & (set(self.lengths) | self._starting))
        if busy:
            raise DecodingError(f"start_beside() starts idle rows only; row {busy[0]} is active or starting")
        finish = self._start_beside(prompts)
        if finish is None:
            return None
        self._starting.update(prompts)

        def complete() -> Tensor:
            if not self._starting.issuperset(prompts):
                raise DecodingError("this start_beside() was completed already")
            self._starting.difference_update(prompts)
            self._check_open()
            logits = finish()
            self.lengths.update({row: len(prompt) for row, prompt in prompts.items()})
            return logits

        return complete

    def _start_beside(self, prompts: dict[int, list[int]]) -> Callable[[], Tensor] | None:
        return None

    def step(self, tokens: Tensor) -> Tensor:
        """Append one token to each active row (`tokens`: (len(active),), in `active` order); return
        the next-token logits (len(active), vocab). The result may be an output buffer that the
        next call overwrites: read or copy it first."""
        tokens = self._check_step(tokens, len(self.lengths), "step() takes one token per active row")
        logits = self._step(tokens.to(self.device))
        self._advance()
        return logits

    def step_every_row(self, tokens: Tensor) -> Tensor:
        """`step` with a token for each of the decoder's rows, in row order (an inactive row's is
        ignored), returning logits for each row (an inactive row's are meaningless; read only the
        active ones). The static-cache decoders compute every row anyway, so this skips `step`'s
        gather and scatter: the engine steps this way, so rows stay in place as requests come and go."""
        tokens = self._check_step(tokens, self.rows, "step_every_row() takes one token per row")
        logits = self._step_every_row(tokens.to(self.device))
        self._advance()
        return logits

    def step_and_pick(self, tokens: Tensor, pick: Callable[[Tensor], Tensor],
                      key: str | None = None) -> tuple[Tensor, Tensor]:
        """`step_every_row(tokens)`, then `pick(logits)`: the caller's device work on the logits
        (choosing the ids, writing them into `tokens` for the next step), which returns the ids.
        Returns (logits, ids). A decoder that records both as one CUDA graph (`self.recorded`)
        replays that instead, from the second call with the same tokens and pick (the first runs
        them as they are) or after prepare_pick; `key` names the variant of `pick` (one graph each;
        None: never recorded)."""
        recorded = self.recorded
        if self.closed or recorded is None or key is None:
            logits = self.step_every_row(tokens)
            return logits, pick(logits)
        # a pick not recorded yet runs once as it is (its kernels load and compile), then is recorded
        if not recorded.ready(key, tokens, pick) and not (recorded.warm(key, tokens, pick)
                                                          and self.prepare_pick(tokens, pick, key)):
            logits = self.step_every_row(tokens)
            ids = pick(logits)
            recorded.ran(key, tokens, pick)
            return logits, ids
        self._check_step(tokens, self.rows, "step_and_pick() takes one token per row")
        ids = recorded.replay(key)
        self._advance()
        return self._recorded_logits(), ids

    def prepare_pick(self, tokens: Tensor, pick: Callable[[Tensor], Tensor], key: str) -> bool:
        """Record step_and_pick(tokens, pick, key) as one CUDA graph now (nothing runs); False where
        this decoder does not record one. `pick`'s kernels must have run once (loaded, compiled), and
        `tokens` and everything `pick` touches must keep their memory: the graph reads and writes
        those addresses."""
        recorded = self.recorded
        if (self.closed or recorded is None or key is None or tokens.device.type != self.device.type
                or tokens.numel() != self.rows):
            return False
        if recorded.ready(key, tokens, pick):
            return True
        return recorded.record(key, tokens, pick, lambda: pick(self._recorded_step(tokens)))

    def _recorded_step(self, tokens: Tensor) -> Tensor:
        """The step as a CUDA graph records it (every row, nothing synchronised): its logits buffer.
        Decoders that set `self.recorded` implement it, and `_recorded_logits`."""
        raise NotImplementedError

    def _recorded_logits(self) -> Tensor:
        """The logits buffer a replay of the recorded step writes, (rows, vocab)."""
        raise NotImplementedError

    def _check_step(self, tokens: Tensor, expected: int, rule: str) -> Tensor:
        self._check_open()
        if not self.lengths:
            raise DecodingError("no active rows: start() some rows before step()")
        tokens = tokens.reshape(-1)
        if tokens.numel() != expected:
            raise DecodingError(f"{rule} ({expected}), got {tokens.numel()}")
        longest = max(self.lengths.values())
        if self.max_length is not None and longest >= self.max_length:
            raise DecodingError(f"a row holds {longest} tokens and is full ({self.capacity_hint})")
        return tokens

    def _advance(self) -> None:
        for row in self.lengths:
            self.lengths[row] += 1

    def _active_index(self) -> Tensor:
        """The active rows as a device index, made when they change, not every step."""
        active = tuple(self.active)
        if self._index[0] != active or self._index[1] is None:
            self._index = (active, to_device(active, torch.int64, self.device))
        return self._index[1]

    def _step_every_row(self, tokens: Tensor) -> Tensor:
        """By default: `_step` over the active rows' tokens, its logits scattered back to their rows."""
        index = self._active_index()
        logits = self._step(tokens.index_select(0, index))
        return logits.new_zeros((self.rows, logits.shape[-1])).index_copy_(0, index, logits)

    def release(self, rows: Iterable[int]) -> None:
        """Free rows; their slots can be started again."""
        rows = [row for row in rows if row in self.lengths]
        if rows and not self.closed:
            self._release(rows)
        for row in rows:
            del self.lengths[row]

    def check_prompts(self, prompts: Mapping[int, Sequence[int]]) -> None:
        """Rows that exist, and prompts of in-vocabulary ids that fit a row."""
        if not prompts:
            raise DecodingError("start() needs at least one prompt")
        for row, prompt in prompts.items():
            if not 0 <= row < self.rows:
                raise DecodingError(f"row {row} does not exist; this decoder has rows 0..{self.rows - 1}")
            if not prompt:
                raise DecodingError("every prompt needs at least one token")
            check_token_ids(prompt, self.vocab_size)
            if self.max_length is not None and len(prompt) > self.max_length:
                raise DecodingError(f"a {len(prompt)}-token prompt is longer than {self.capacity_hint}")

    def _check_open(self) -> None:
        if self.closed:
            raise DecodingError(f"{self.name}: the decoder is closed; open a new one")

    @abc.abstractmethod
    def _start(self, prompts: dict[int, list[int]], all_logits: bool) -> Tensor | list[Tensor]: ...

    @abc.abstractmethod
    def _step(self, tokens: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def _release(self, rows: list[int]) -> None: ...

    def close(self) -> None:
        self.closed = True
        self.lengths.clear()
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
