"""The tritonserver that nvidia-pytriton bundles, run on a model repository: found in the installed
package, given its python backend and environment, started on the given address and ports, its
`generate` model loaded and waited for, and stopped (the model unloaded, which lets its streams
finish within the exit timeout; then SIGTERM; then the process group is killed if anything is left).
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from models.errors import ToolkitError

from .metrics import prometheus_sums

# The APIs that change the server's state (load and unload models, the log level, tracing, shared-
# memory regions) take the key only `serve` holds; health, metadata, inference and statistics are open.
RESTRICTED_APIS = "model-repository,logging,trace,shared-memory"
SYS_PATH_VARIABLE = "ROTARY_SERVE_SYS_PATH"  # the stub ignores PYTHONPATH; model_entry reads this instead
TOOLKIT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding models/, export/, runtime/
RESTRICTED_HEADER = "rotary-serve-key"  # the repository API (load/unload) answers only requests carrying it
POLL_S = 0.1
UNLOAD_REQUEST_S = 10.0  # how long an unload request is repeated while Triton does not answer
DRAIN_MARGIN_S = 5  # of the exit timeout, left for unloading after the streams' drain
HELD_S = 2.0  # a model still loaded this long with nothing in flight, and not finalizing, is held by tritonserver
# what serve reads to tell: generate's gauges (triton_model.METRICS), summed over its instances, and
# Triton's count of requests not yet handed to the model
ACTIVE, QUEUED = "rotary_generate_active_rows", "rotary_generate_queue_length"
OPEN, UNLOADING = "rotary_generate_open_streams", "rotary_generate_unloading"
PENDING = "nv_inference_pending_request_count"
HELD_NOTE = ("tritonserver kept {model} loaded after every request to it had ended (seen after clients cancel gRPC "
             "streams: a race in Triton 2.51, see docs/serving.md); the server was stopped anyway")


class ServerError(ToolkitError):
    """The Triton server could not be found, started or asked to load a model."""


@dataclass(frozen=True)
class Endpoints:
    host: str = "127.0.0.1"
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.metrics}/metrics"

    def describe(self) -> dict:
        return {"http": self.url, "grpc": f"{_url_host(self.host)}:{self.grpc}", "metrics": self.metrics_url,
                "health": f"{self.url}/v2/models/generate/ready"}  # ready means servable: generate is loaded


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def bundled_root() -> Path:
    """pytriton/tritonserver inside the installed nvidia-pytriton package."""
    spec = importlib.util.find_spec("pytriton")
    root = Path(spec.origin).parent / "tritonserver" if spec and spec.origin else None
    if root is None or not (root / "bin" / "tritonserver").is_file():
        raise ServerError("serve needs the tritonserver bundled with nvidia-pytriton; install the serve extra "
                          "(pip install -e '.[serve]')")
    return root


def backend_directory(root: Path, workdir: Path) -> Path:
    """Triton's python backend with the stub built for this interpreter beside it, as Triton expects."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the bundled Triton has no python backend stub for Python {version}; use Python 3.8-3.13")
    python = workdir / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for source in (*(root / "backends" / "python").glob("*.so"), root / "backends" / "python" /
                   "triton_python_backend_utils.py", stub):
        shutil.copy2(source, python / source.name)
    return python.parent


def server_environment(root: Path) -> dict[str, str]:
    """The stub embeds libpython: it must load this interpreter's (LIBDIR), find this environment's
    python3 first on PATH, and import this toolkit."""
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(root.parents[1] / "nvidia_pytriton.libs"),
            env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(part for part in libs if part)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(part for part in (str(TOOLKIT_ROOT), env.get("PYTHONPATH", "")) if part)
    env["ROTARY_SERVE_PYTHON"] = sys.executable  # the decode process runs on it (the stub's own may differ)
    env[SYS_PATH_VARIABLE] = json.dumps([str(TOOLKIT_ROOT), *(part for part in sys.path if part)])  # see model_entry
    return env


class TritonServer:
    """A tritonserver process in its own process group, serving `repository` with explicit model control."""

    def __init__(self, repository: Path, endpoints: Endpoints, workdir: Path, exit_timeout: int = 30,
                 log_path: Path | None = None):
        root = bundled_root()
        self.endpoints, self.exit_timeout = endpoints, exit_timeout
        self.loaded: list[str] = []
        self.stop_problem: str | None = None  # why a graceful stop could not unload a model
        self.held: list[str] = []  # models tritonserver kept loaded with nothing in flight (see HELD_NOTE)
        self.finalizing: set[str] = set()  # models one of whose instances was seen being finalized
        self.key = secrets.token_hex(16)
        self.log_path = log_path or workdir / "tritonserver.log"
        e = endpoints
        command = [str(root / "bin" / "tritonserver"), f"--model-repository={repository}",
                   f"--backend-directory={backend_directory(root, workdir)}", "--model-control-mode=explicit",
                   f"--http-address={e.host}", f"--http-port={e.http}", f"--grpc-address={e.host}",
                   f"--grpc-port={e.grpc}", f"--metrics-address={e.host}", f"--metrics-port={e.metrics}",
                   f"--exit-timeout-secs={min(exit_timeout, DRAIN_MARGIN_S)}",  # stop() drains first
                   f"--http-restricted-api={RESTRICTED_APIS}:{RESTRICTED_HEADER}={self.key}",
                   f"--grpc-restricted-protocol={RESTRICTED_APIS}:{RESTRICTED_HEADER}={self.key}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=server_environment(root), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=die_with_parent)

    def wait_live(self, timeout: float) -> None:
        """Until the HTTP endpoint answers (the server is up, no model loaded yet)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            if http_status(f"{self.endpoints.url}/v2/health/live") == 200:
                return
            time.sleep(POLL_S)
        raise ServerError(f"tritonserver did not answer on {self.endpoints.url} within {timeout:.0f} s; "
                          f"see {self.log_path}")

    def load(self, model: str, config: dict | None, timeout: float) -> None:
        """Load `model` (with `config` replacing its config.pbtxt when given) and wait until it is ready."""
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        request = self._restricted(f"/v2/repository/models/{model}/load", body)
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                pass
        except urllib.error.HTTPError as error:
            detail = error_text(error.read())
            raise ServerError(f"the {model} model did not load ({detail}); see {self.log_path}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            self.check_running()
            raise ServerError(f"loading the {model} model failed ({error}); see {self.log_path}") from None
        if http_status(f"{self.endpoints.url}/v2/models/{model}/ready") != 200:
            raise ServerError(f"the {model} model loaded but is not ready; see {self.log_path}")
        self.loaded.append(model)

    def unload(self, model: str) -> bool:
        """Unload `model`, which Triton does once its streams have finished; streams still running
        after the exit timeout (less DRAIN_MARGIN_S) are failed with a retry message (SIGTERM to the
        decode processes). Unloading before SIGTERM matters: at SIGTERM Triton first waits for every
        open HTTP connection, idle keep-alive ones too, for its whole exit timeout, and then has no
        time left to unload. A model that stays loaded with nothing in flight is held by tritonserver
        itself: it is noted in `held`, and nothing waits for it. False when the model was not gone
        (or known to be held) in time."""
        decoders = set(self.model_processes()) - set(processes_below(self.process.pid, depth=1))
        try:
            self._request_unload(model)
        except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as error:
            self.stop_problem = f"the request to unload {model} failed ({error})"
            return False
        state = self._wait_unloaded(model, max(self.exit_timeout - DRAIN_MARGIN_S, 0))
        if state == "loaded":
            for pid in decoders:  # the drain is over: fail what is left
                _signal(pid, signal.SIGTERM)
            state = self._wait_unloaded(model, DRAIN_MARGIN_S + 10)
        if state == "held":
            self.held.append(model)
        elif state == "loaded":
            self.stop_problem = f"{model} was still loaded {DRAIN_MARGIN_S + 10} s after its decode processes were stopped"
        return state != "loaded"

    def _request_unload(self, model: str) -> None:
        """Ask Triton to unload `model` (it answers at once and unloads in the background), again
        while it does not answer for up to UNLOAD_REQUEST_S: a loaded machine can be slow to."""
        deadline = time.monotonic() + UNLOAD_REQUEST_S
        while True:
            try:
                with urllib.request.urlopen(self._restricted(f"/v2/repository/models/{model}/unload", {}), timeout=10):
                    return
            except urllib.error.HTTPError:
                raise  # an answer: asking again changes nothing
            except (urllib.error.URLError, TimeoutError, ConnectionError):
                if time.monotonic() > deadline or not self.running():
                    raise
            time.sleep(POLL_S)

    def _wait_unloaded(self, model: str, within: float) -> str:
        """Up to `within` seconds, until `model` is gone from Triton's repository index ("gone"), or
        has stayed loaded for HELD_S with nothing in flight and none of its instances ever seen
        being finalized ("held": tritonserver finalizes the instances once nothing refers to the
        model); else "loaded"."""
        deadline, idle_since = time.monotonic() + within, None
        while self.running():
            try:
                with urllib.request.urlopen(self._restricted("/v2/repository/index", {}), timeout=5) as response:
                    states = {entry.get("state") for entry in json.load(response) if entry.get("name") == model}
            except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError):
                states = {"UNLOADING"}  # no (readable) answer in time: not known to be gone, ask again until the deadline
            if not states & {"READY", "LOADING", "UNLOADING"}:
                return "gone"
            now, gauges = time.monotonic(), self._gauges(model)
            if gauges and gauges[UNLOADING]:  # from then on its unload goes its normal way, however long
                self.finalizing.add(model)
            idle = gauges is not None and model not in self.finalizing and not any(gauges.values())
            idle_since = (now if idle_since is None else idle_since) if idle else None
            if idle_since is not None and now - idle_since >= HELD_S:
                return "held"
            if now > deadline:
                return "loaded"
            time.sleep(POLL_S)
        return "loaded"

    def _gauges(self, model: str) -> dict[str, float] | None:
        """`model`'s in-flight gauges on Triton's /metrics (the five above), each summed over its
        instances; None when any is missing or unreadable."""
        try:
            with urllib.request.urlopen(urllib.request.Request(self.endpoints.metrics_url), timeout=2) as response:
                text = response.read().decode("utf-8", "replace")
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            return None
        try:
            sums = prometheus_sums(text, (ACTIVE, QUEUED, OPEN, UNLOADING, PENDING), model)
        except ValueError:
            return None
        return sums if len(sums) == 5 else None

    def _restricted(self, path: str, body: dict) -> urllib.request.Request:
        """A POST to one of the APIs only serve's key opens."""
        return urllib.request.Request(f"{self.endpoints.url}{path}", data=json.dumps(body).encode(), method="POST",
                                      headers={RESTRICTED_HEADER: self.key, "Content-Type": "application/json"})

    def running(self) -> bool:
        return self.process.poll() is None

    def model_processes(self) -> dict[int, str]:
        """The server's model processes now: the python-backend stubs and what they started (the
        decode process), two levels below tritonserver."""
        return processes_below(self.process.pid, depth=2)

    def check_model_processes(self, expected: dict[int, str]) -> None:
        """A model process that died (killed, crashed, out of memory) leaves its requests hanging and
        Triton still reporting ready: fail, so serve stops and a supervisor restarts it."""
        alive = processes_below(self.process.pid, depth=2)
        for pid, name in expected.items():
            if pid not in alive:
                raise ServerError(f"a model process of the server died ({name}, pid {pid}); serve stopped so that "
                                  f"its supervisor can restart it; see {self.log_path}")

    def check_running(self) -> None:
        if not self.running():
            raise ServerError(f"tritonserver exited with code {self.process.returncode} "
                              f"({_last_error(self.log_path)}); see {self.log_path}")

    def stop(self, graceful: bool = True) -> int | None:
        """Unload the models (their streams drain), SIGTERM, then kill whatever of the group is left
        (at once when not `graceful`). Returns tritonserver's exit code (None if it had to be killed)."""
        code = None
        if graceful and self.running():
            for model in reversed(self.loaded):
                self.unload(model)
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(DRAIN_MARGIN_S + 15)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(self.process.pid)
        self.process.wait()
        return code


def die_with_parent() -> None:
    """In a child before exec: the kernel sends it SIGKILL when `serve` dies, even by SIGKILL, so no
    server or front end outlives it (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def processes_below(pid: int, depth: int) -> dict[int, str]:
    """Live processes up to `depth` levels below `pid`, with their names (Linux /proc)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name, rest = (entry / "stat").read_text().split(" (", 1)[1].rsplit(") ", 1)
            state, parent = rest.split()[:2]
        except (OSError, ValueError, IndexError):
            continue
        if state != "Z":  # a zombie has died
            children.setdefault(int(parent), []).append((int(entry.name), name))
    found, level = {}, [pid]
    for _ in range(depth):
        below = []
        for parent in level:
            for child, name in children.get(parent, []):
                found[child] = name
                below.append(child)
        level = below
    return found


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(pgid: int) -> None:
    """The python backend stubs run in the server's process group; none may outlive it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def http_status(url: str) -> int | None:
    """The HTTP status a GET of `url` answers, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return None


def error_text(body: bytes) -> str:
    """Triton's error body ({"error": ...} or plain text) as one line of at most 400 characters."""
    try:
        text = json.loads(body).get("error", "")
    except (ValueError, AttributeError):
        text = body.decode("utf-8", "replace")
    return " ".join(text.split())[:400] or "no detail"


def _last_error(log_path: Path) -> str:
    """The last error line tritonserver logged (lines starting E or 'error:')."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("E") or "error" in line.lower()]
    return " ".join((errors or lines or ["no output"])[-1].split())[:300]
