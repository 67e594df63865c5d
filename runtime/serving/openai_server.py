"""The OpenAI-compatible app (openai_api) served by uvicorn on a thread of `serve`'s process:
started once `generate` is ready, stopped first at shutdown, so open streams finish before
Triton drains."""
from __future__ import annotations

import ipaddress
import json
import threading
import time
import urllib.request

from .tritonserver import ServerError

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


class OpenAIServer:
    def __init__(self, app, host: str, port: int, graceful_s: int):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=graceful_s)
        self.server = uvicorn.Server(config)
        self.where = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(target=self.server.run, name="openai-api", daemon=True)

    def start(self, timeout: float = 30.0) -> "OpenAIServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServerError(f"the OpenAI endpoint could not listen on {self.where}; is the port in use? "
                                  "choose another with --openai-port")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float) -> None:
        """Stop accepting; open streams may finish within the graceful timeout."""
        self.server.should_exit = True
        self._thread.join(timeout + 5.0)
