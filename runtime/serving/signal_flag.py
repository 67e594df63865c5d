"""A stop flag that a signal handler may set.

threading.Event.set takes a lock; a second signal that arrives while the first handler (or the main
thread's wait) holds it runs its handler on the same thread, which then waits for that lock forever:
`serve` hung on SIGTERM followed at once by SIGINT (as `timeout` sends). Setting a plain attribute
takes no lock."""
from __future__ import annotations

import time

POLL_S = 0.05


class SignalFlag:
    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Whether the flag is set, waiting up to `timeout` seconds for it (polling)."""
        deadline = time.monotonic() + timeout
        while not self._set and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, POLL_S))
        return self._set
