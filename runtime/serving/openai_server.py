"""The OpenAI-compatible app (openai_api) served by uvicorn in processes of its own: started once
`generate` is ready; at shutdown it stops accepting first, its open streams end as `generate`
drains, then it exits."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from .tritonserver import TOOLKIT_ROOT, ServerError, die_with_parent

KEY_VARIABLE = "ROTARY_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def generate_facts(http_url: str) -> tuple[int, int | None]:
    """(vocabulary size, tokens a row holds) from generate's config parameters."""
    with urllib.request.urlopen(f"{http_url}/v2/models/generate/config", timeout=10) as response:
        config = json.loads(response.read())
    values = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
    capacity = values.get("capacity", "")
    return int(values.get("vocab_size", "256")), int(capacity) if capacity.isdigit() else None


READY_S = 60.0  # how long the workers may take to start (each imports FastAPI and tritonclient)


def default_workers() -> int:
    """One worker process per four cores, at most four: one event loop sends ~7,000 events/s."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class OpenAIProcess:
    """The OpenAI-compatible app under uvicorn in a process group of its own, with `workers` worker
    processes (uvicorn's supervisor shares one listening socket between them): one Python event
    loop capped the endpoint at under half of what gRPC delivered at 32 clients on the H200."""

    def __init__(self, settings: dict, host: str, port: int, workers: int, graceful_s: int):
        from .openai_api import SETTINGS_VARIABLE

        env = dict(os.environ, **{SETTINGS_VARIABLE: json.dumps(settings)})
        env["PYTHONPATH"] = os.pathsep.join(part for part in (str(TOOLKIT_ROOT), env.get("PYTHONPATH", "")) if part)
        command = [sys.executable, "-m", "uvicorn", "runtime.serving.openai_api:app_from_environment", "--factory",
                   "--host", host, "--port", str(port), "--workers", str(workers), "--log-level", "warning",
                   "--no-access-log", "--lifespan", "off", "--timeout-graceful-shutdown", str(graceful_s)]
        self.where = f"http://{host}:{port}/v1"
        probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self._probe = f"http://{probe_host}:{port}/v1/models"
        self._key, self.graceful_s = settings.get("api_key"), graceful_s
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=die_with_parent)

    def start(self, timeout: float = READY_S) -> "OpenAIProcess":
        """Wait until the endpoint answers; a port in use or a failed start is one ServerError."""
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        while True:
            if self.process.poll() is not None:
                raise ServerError(f"the OpenAI endpoint could not listen on {self.where} (uvicorn exited with code "
                                  f"{self.process.returncode}; see its message above); is the port in use? choose "
                                  "another with --openai-port")
            try:
                with urllib.request.urlopen(urllib.request.Request(self._probe, headers=headers), timeout=2):
                    return self
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop(0)
                raise ServerError(f"the OpenAI endpoint did not answer on {self.where} within {timeout:.0f} s")
            time.sleep(0.1)

    def stop_accepting(self) -> None:
        """Refuse new connections; open streams go on (they end as generate drains)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float) -> None:
        """Stop accepting; open streams may finish within `timeout` seconds (0: none, after a failure
        nothing waits for the workers' shutdown); then nothing is left."""
        if timeout > 0 and self.process.poll() is None:
            self.stop_accepting()
            try:
                self.process.wait(timeout + 10.0)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()
