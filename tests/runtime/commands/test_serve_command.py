"""`serve`: SIGTERM drains an in-flight stream and exits 0 leaving no process and no bound port;
bad input is one error line before anything starts; --help imports no serving library."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from command_helpers import assert_one_line_error
from triton_process import ROOT, ServeProcess, free_ports
from runtime.commands.serve import main
from runtime.serving.stale import remove_killed_servers_folders
from runtime.serving.clients import http_generate

STREAM = 2000  # tokens: still in flight when SIGTERM arrives
# The kill test's stream: with 2,000 tokens the stream twice ended whole in CI after the decode
# process was killed (on two loaded cores the tiny model decodes fast), so nothing was cut
LONG_STREAM = 15_000


def start_stream(url: str, tokens: int):
    """A generate stream of `tokens` new tokens on a thread: (thread, {"stream": result} once done,
    [tokens received so far], an Event set at the first token)."""
    result, received, first_token = {}, [0], threading.Event()

    def on_token(count: int) -> None:
        received[0] = count
        first_token.set()

    thread = threading.Thread(target=lambda: result.update(stream=http_generate(
        url, {"prompt_ids": [1, 2, 3], "max_new_tokens": tokens}, 60, on_token=on_token)))
    thread.start()
    return thread, result, received, first_token


def test_sigterm_lets_the_in_flight_stream_finish_then_exits_cleanly(serving_graph, tmp_path):
    """SIGTERM is sent at the stream's first token; 2000 tokens take over a second to decode (400 took
    0.15 s, which could end before the signal arrived and leave nothing to drain). SIGINT and SIGTERM
    follow at once, as `timeout` forwards a signal, and the stop stays graceful. (A handler that took a
    lock, threading.Event.set, hung serve for good when a signal arrived 50 us into the first one's
    handler; sent back to back from here that does not reproduce reliably.)"""
    server = ServeProcess(serving_graph, tmp_path)
    try:
        thread, result, received, first_token = start_stream(server.url, STREAM)
        # the client's first token, not the metrics (published every 0.25 s, which a fast stream can outrun)
        assert first_token.wait(30), "no token within 30 s"
        at_sigterm = received[0]
        code = server.terminate(signals=("SIGTERM", "SIGINT", "SIGTERM"))  # waits for the exit
        thread.join(60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert code == 0, server.log.read_text()[-2000:]
    assert at_sigterm < STREAM, "the stream had finished before SIGTERM; nothing was in flight"
    assert result["stream"].error is None and len(result["stream"].tokens) == STREAM  # drained, not cut
    triton_log = (tmp_path / "tritonserver.log").read_text()
    # Triton closes its listeners at once and unloads generate, whose scheduler finishes active rows first
    assert "successfully unloaded 'generate'" in triton_log
    output = server.log.read_text()
    assert "serve: stopped" in output
    assert output.index("serve: starting tritonserver") < output.index("serve: loading generate") < \
        output.index("serve: generate ready")  # progress before the ready line
    assert server.leftovers() == ([], [])
    assert not list(server.tmpdir.glob("rotary-*"))  # its work folder and the decode process's rendezvous are gone


def test_streams_longer_than_the_exit_timeout_are_cut_and_serve_still_exits_0(serving_graph, tmp_path):
    """--exit-timeout 6 leaves the streams 1 s to drain (5 s go to unloading); a 15,000-token stream
    (over ten seconds) over Triton's HTTP and one over the OpenAI API are then failed with a retry
    message. A client holding an idle keep-alive connection, which kept Triton waiting for its whole
    exit timeout and made it exit 1, does not hold the stop either."""
    import http.client

    import openai

    server = ServeProcess(serving_graph, tmp_path, ["--exit-timeout", "6"])
    idle = http.client.HTTPConnection("127.0.0.1", server.http, timeout=30)
    idle.request("GET", "/v2/health/live")
    assert idle.getresponse().read() == b""  # answered; the connection stays open
    openai_error: list[Exception] = []
    openai_first = threading.Event()

    def read_openai() -> None:
        client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60)
        try:
            for _ in client.completions.create(model="rotary", prompt=[1, 2, 3], max_tokens=LONG_STREAM, stream=True):
                openai_first.set()
        except openai.APIError as error:
            openai_error.append(error)

    try:
        # the OpenAI stream first (its first token can take seconds on a loaded machine), then Triton's, then
        # the stop at once: started together, Triton's stream once ran to its end while the other one started
        openai_thread = threading.Thread(target=read_openai)
        openai_thread.start()
        assert openai_first.wait(30), "no OpenAI token within 30 s"
        thread, result, received, first_token = start_stream(server.url, LONG_STREAM)
        assert first_token.wait(30), "no token within 30 s"
        code = server.terminate()
        thread.join(60)
        openai_thread.join(60)
    finally:
        idle.close()
        if server.process.poll() is None:
            server.process.kill()
    assert code == 0, server.log.read_text()[-2000:]
    stream = result["stream"]
    assert len(stream.tokens) < LONG_STREAM
    assert "the server shut down before this request finished; retry it" in stream.error
    assert openai_error and "the server shut down before this request finished" in str(openai_error[0])
    assert server.leftovers() == ([], [])


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "model not found: missing.onnx"),
    (["{tmp}"], "is not a repository written by export-triton"),
    (["--port", "0"], "--port must be a port number 1-65535, got 0"),
    (["--port", "9000", "--grpc-port", "9000"], "--port, --grpc-port, --metrics-port, --openai-port must differ"),
    (["{static}", "--port", "{free}", "--max-prompt-tokens", "256"],
     "--max-prompt-tokens (max_prompt_tokens) 256 leaves no room for new tokens"),
    (["--checkpoint", "x.pt", "--preset", "tiny"], "give either --checkpoint or --preset, not both"),
    (["--openai-workers", "0"], "--openai-workers must be at least 1, got 0"),
    (["--preset", "tiny", "--max-rows", "100000000"], "--max-rows (max_rows) must be an integer from 1 to 4096"),
    (["--preset", "tiny", "--queue", "-1"], "--queue (max_queue) must be an integer from 0 to 1048576, got -1"),
    (["--preset", "tiny", "--gpus", "1"], "--gpus needs a GPU, and this machine has none that PyTorch can see"),
    (["--preset", "tiny", "--gpus", "0,0"], "--gpus: lists each GPU once, by ids from 0 to 63; got '0,0'"),
    (["--preset", "tiny", "--gpus", "all", "--device", "cpu"], "--gpus places generate on GPUs; drop --device cpu"),
])
def test_bad_input_is_one_error_line(tiny_static_onnx, tmp_path, capsys, args, message):
    (free,) = free_ports(1)
    argv = [a.format(tmp=tmp_path, static=tiny_static_onnx, free=free) for a in args]
    assert main(argv) == 2
    assert_one_line_error(capsys, "serve", message)


def test_a_gpu_the_machine_does_not_have_is_refused_before_anything_starts(tmp_path, capsys, monkeypatch):
    from runtime.commands import serve

    monkeypatch.setattr(serve, "_gpu_count", lambda: 2)
    monkeypatch.setattr(serve, "_serve_on", lambda *a: pytest.fail("started"))
    assert main(["--preset", "tiny", "--gpus", "0,3"]) == 2
    assert_one_line_error(capsys, "serve", "--gpus names GPU 3, but this machine has 2 (ids 0 to 1)")
    assert main(["--preset", "tiny", "--gpus", "4"]) == 2
    assert_one_line_error(capsys, "serve", "--gpus names GPU 2, but this machine has 2 (ids 0 to 1)")


def _free(ports) -> bool:
    import socket

    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@pytest.mark.parametrize("flag, offset", [("--port", 0), ("--grpc-port", 1), ("--metrics-port", 2), ("--openai-port", 3)])
def test_a_port_another_server_holds_is_named_before_anything_starts(capsys, monkeypatch, flag, offset):
    """Triton's load request once reached an earlier serve on the same port, and the error quoted
    that server's refusal of it instead of naming the port."""
    import socket

    from runtime.commands import serve

    monkeypatch.setattr(serve, "_serve_on", lambda *a: pytest.fail("started"))
    base = next(port for port in (free_ports(1)[0] for _ in range(50)) if port < 65532 and _free(range(port, port + 4)))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + offset))
        holder.listen()
        assert main(["--preset", "tiny", "--port", str(base)]) == 2
    assert_one_line_error(capsys, "serve", f"{flag} {base + offset} is in use on 127.0.0.1 (another server, perhaps "
                                           f"an earlier serve); stop it, or pass another {flag}")


def test_device_cuda_without_cuda_is_refused_before_anything_starts(tiny_static_onnx, capsys, monkeypatch):
    from runtime.commands import serve

    monkeypatch.setattr(serve, "_cuda", lambda: False)
    monkeypatch.setattr(serve, "_serve_on", lambda *a: pytest.fail("started"))
    assert main([str(tiny_static_onnx), "--device", "cuda"]) == 2
    assert_one_line_error(capsys, "serve", "--device cuda: PyTorch sees no CUDA GPU on this machine; use --device cpu")


def test_a_repository_placed_on_gpus_the_machine_lacks_is_refused_before_anything_starts(tiny_static_onnx, tmp_path,
                                                                                         capsys, monkeypatch):
    from runtime.commands import serve
    from runtime.commands.export_triton import main as export_triton

    repository = tmp_path / "repo"
    assert export_triton([str(tiny_static_onnx), "-o", str(repository), "--gpus", "0,1"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(serve, "_serve_on", lambda *a: pytest.fail("started"))
    for count, message in [(0, f"{repository} (written by export-triton --gpus) needs a GPU, and this machine has "
                                "none that PyTorch can see; serve it on a GPU machine, or export a repository "
                                "without --gpus for this one"),
                           (1, f"{repository} (written by export-triton --gpus) names GPU 1, but this machine has 1")]:
        monkeypatch.setattr(serve, "_gpu_count", lambda: count)
        assert main([str(repository)]) == 2
        assert_one_line_error(capsys, "serve", message)


def test_help_imports_no_serving_library():
    code = ("import sys; from runtime.commands import serve, loadtest, export_triton\n"
            "for m in (serve, loadtest, export_triton):\n"
            "    try: m.main(['--help'])\n"
            "    except SystemExit: pass\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('tritonclient', 'pytriton', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_public_openai_address_without_a_key_is_refused_before_any_work(capsys, monkeypatch):
    monkeypatch.delenv("ROTARY_API_KEY", raising=False)
    assert main(["--openai-host", "0.0.0.0", "--preset", "tiny"]) == 2
    assert_one_line_error(capsys, "serve", "--openai-host 0.0.0.0 is reachable from other machines: set --api-key KEY")


def test_a_missing_openai_dependency_is_named_before_any_work(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["--preset", "tiny"]) == 2
    assert_one_line_error(capsys, "serve", "the OpenAI-compatible API needs fastapi, not installed here: install the "
                                           "serve extra (pip install -e '.[serve]'), or pass --openai-port 0")


def test_sigterm_lets_an_open_openai_stream_finish(serving_graph, tmp_path):
    """The OpenAI front end stops accepting first; its open server-sent-event stream runs on while
    generate drains, then serve exits 0."""
    import openai

    server = ServeProcess(serving_graph, tmp_path)
    chunks, first = [], threading.Event()

    def read() -> None:
        client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60)
        for chunk in client.completions.create(model="rotary", prompt=[1, 2, 3], max_tokens=STREAM, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            chunks.append(chunk)
            first.set()

    try:
        thread = threading.Thread(target=read)
        thread.start()
        assert first.wait(30), "no chunk within 30 s"
        code = server.terminate()
        thread.join(60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert code == 0, server.log.read_text()[-2000:]
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == STREAM
    assert "serve: stopped" in server.log.read_text() and server.leftovers() == ([], [])


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


@pytest.mark.parametrize("victim", ["triton_python_b", "python"])
def test_a_model_process_that_dies_stops_serve_with_an_error(serving_graph, tmp_path, victim):
    """SIGKILL a python-backend stub (comm `triton_python_backend_stub`, cut to 15 characters) or
    the decode process it started, mid-stream: the open stream ends in an error within seconds
    instead of hanging, serve exits non-zero at once (no drain to wait for) with one error line
    that names a log file that exists, and nothing of the server is left."""
    import os
    import re
    import signal
    import time
    from pathlib import Path

    from runtime.serving.tritonserver import processes_below

    server = ServeProcess(serving_graph, tmp_path, ["--log", str(tmp_path / "kept.log")])
    try:
        thread, result, count, first = start_stream(server.url, LONG_STREAM)
        assert first.wait(30), "no token within 30 s"
        tritonserver = next(pid for pid, name in processes_below(server.process.pid, 1).items() if name == "tritonserver")
        below = processes_below(tritonserver, 2)
        # the decode process by its command line, not any python below the server
        targets = [pid for pid, name in below.items() if name.startswith(victim) and (victim != "python" or (
            pid not in processes_below(tritonserver, 1) and b"runtime.serving.decode_loop" in _cmdline(pid)))]
        assert targets, below
        killed_at, at_kill = time.monotonic(), count[0]
        os.kill(targets[0], signal.SIGKILL)
        code = server.process.wait(30)
        stopped_in = time.monotonic() - killed_at
        thread.join(30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    output = server.log.read_text()
    assert code == 2 and stopped_in < 15, output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("serve: error:")]
    assert len(errors) == 1 and "a model process of the server died" in errors[0], output[-2000:]
    named = re.search(r"see (\S+)$", errors[0]).group(1)
    assert Path(named).is_file() and Path(named) == tmp_path / "kept.log"
    stream = result["stream"]  # ended with the server, seconds after the kill, short of what it asked
    assert at_kill < LONG_STREAM, "the stream had finished before the kill; nothing was in flight"
    assert not thread.is_alive() and stream.error is not None and len(stream.tokens) < LONG_STREAM, \
        f"{stream.error}; {at_kill} tokens had arrived at the kill, {len(stream.tokens)} in all"
    assert server.leftovers() == ([], [])


def test_a_public_triton_host_is_warned_about():
    from runtime.commands.serve import public_triton_warning

    assert public_triton_warning("127.0.0.1") is None and public_triton_warning("localhost") is None
    assert "have no authentication" in public_triton_warning("0.0.0.0")


def test_a_killed_serve_leaves_no_process_and_no_port(serving_graph, tmp_path):
    """SIGKILL gives serve no chance to clean up: the kernel ends tritonserver and the OpenAI front
    end with it (PR_SET_PDEATHSIG), the stubs and the decode process follow their parents."""
    import signal
    import time

    server = ServeProcess(serving_graph, tmp_path)
    tree = server.tree
    assert len(tree) >= 4, tree  # tritonserver, a stub, the decode process, the front end
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    deadline = time.monotonic() + 20
    while server.leftovers() != ([], []) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.leftovers() == ([], [])
    # its work folder (the model's copy) stays behind, and the next serve removes it as it starts
    left = list(server.tmpdir.glob("rotary-*"))
    assert "serve" in [p.name.split("-")[1] for p in left], left
    assert sorted(remove_killed_servers_folders(server.tmpdir)) == sorted(left)
    assert not list(server.tmpdir.glob("rotary-*"))
