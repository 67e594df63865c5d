"""A `serve` process for the tests, and the checks that it left no process and no port behind."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# max_new_tokens: a 16000-token stream takes over ten seconds, so a client that hangs up after its first
# tokens is gone long before the stream could end (400 tokens took 0.15 s, racing the cancellation,
# which took 0.1-0.2 s and at worst 2.3 s, 3131 tokens, in 12 tries on 2 busy cores)
SERVER_LIMITS = {"max_rows": 8, "max_prompt_tokens": 48, "max_new_tokens": 16000, "max_queue": 64}
SERVER_START_S = 120  # bounded: starting tritonserver and loading generate takes ~6 s on 2 cores


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held open together so they differ)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port and it can be bound again (SO_REUSEADDR, as servers bind:
    connections of finished clients may linger in TIME_WAIT)."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        pass
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    from runtime.serving.tritonserver import processes_below

    return set(processes_below(pid, depth=64))


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class ServeProcess:
    """`serve` run as users run it, in a subprocess on 127.0.0.1 with free ports."""

    def __init__(self, model: Path, workdir: Path, extra: list[str] = ()):
        import os
        import shutil
        import subprocess
        import sys
        import tempfile
        import time
        import weakref

        self.http, self.grpc, self.metrics, self.openai = free_ports(4)
        self.url, self.grpc_url = f"http://127.0.0.1:{self.http}", f"127.0.0.1:{self.grpc}"
        self.openai_url = f"http://127.0.0.1:{self.openai}/v1"
        self.ready_file, self.log = workdir / "ready.json", workdir / "serve.log"
        self.triton_log = workdir / "tritonserver.log"
        limits = [f"--max-rows={SERVER_LIMITS['max_rows']}", f"--max-prompt-tokens={SERVER_LIMITS['max_prompt_tokens']}",
                  f"--max-new-tokens-limit={SERVER_LIMITS['max_new_tokens']}", f"--queue={SERVER_LIMITS['max_queue']}"]
        command = [sys.executable, "-m", "runtime.commands.serve", str(model), "--port", str(self.http), "--grpc-port",
                   str(self.grpc), "--metrics-port", str(self.metrics), "--openai-port", str(self.openai),
                   "--json", str(self.ready_file),
                   "--log", str(self.triton_log), "--exit-timeout", "20", *limits, *extra]
        # a temporary directory of its own (short: the decode process's socket lives in it), so that
        # what a killed serve leaves is this test's to see and is removed with the test's object
        self.tmpdir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp" if Path("/tmp").is_dir() else None))
        weakref.finalize(self, shutil.rmtree, self.tmpdir, True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env={**os.environ, "TMPDIR": str(self.tmpdir)})
        deadline = time.monotonic() + SERVER_START_S
        while not self.ready_file.is_file():
            assert self.process.poll() is None, f"serve exited early:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"serve not ready in {SERVER_START_S} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.1)
        self.tree = descendants(self.process.pid)  # tritonserver and its python backend stub

    def metric(self, name: str, **labels) -> float:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as response:
            text = response.read().decode()
        wanted = [f'{key}="{value}"' for key, value in labels.items()]
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name + "{") and all(label in line for label in wanted)]
        assert values, f"metric {name} {labels} not found"
        return sum(values)  # summed over generate's instances

    def load(self) -> dict[str, float]:
        """Active rows and queued requests, summed over generate's instances."""
        return {name: self.metric(f"rotary_generate_{name}") for name in ("active_rows", "queue_length")}

    def settled(self, timeout: float = 30.0) -> bool:
        """Whether no row is active and nothing queued within `timeout` (gauges publish every 0.25 s)."""
        import time

        deadline = time.monotonic() + timeout
        while any(self.load().values()):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def terminate(self, timeout: float = 60, signals: tuple = ("SIGTERM",)) -> int:
        """Send `signals` back to back, then wait for the exit."""
        import signal

        for name in signals:
            self.process.send_signal(getattr(signal, name))
        return self.process.wait(timeout)

    def leftovers(self) -> tuple[list[int], list[int]]:
        """(processes of this server still running, its ports still bound)."""
        return ([pid for pid in self.tree | {self.process.pid} if alive(pid)],
                [port for port in (self.http, self.grpc, self.metrics, self.openai) if not port_is_free(port)])
