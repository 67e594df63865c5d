"""`loadtest` against the session's real server: reports, JSON with integer errors, the chart."""
from __future__ import annotations

import json
import threading

import pytest

from command_helpers import assert_one_line_error
from triton_process import free_ports
from runtime.commands.loadtest import main


def test_concurrent_grpc_streams_report_latency_and_no_errors(triton_server, tmp_path, capsys):
    report, chart = tmp_path / "load.json", tmp_path / "latency.png"
    code = main(["--url", triton_server.url, "--grpc-url", triton_server.grpc_url, "--concurrency", "1,4",
                 "--metrics-url", f"127.0.0.1:{triton_server.metrics}", "--requests", "8", "--max-new-tokens", "16", "--json", str(report), "--plot", str(chart)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["errors"] == 0 and isinstance(data["errors"], int)
    assert [level["concurrency"] for level in data["levels"]] == [1, 4]
    for level in data["levels"]:
        assert level["requests"] == 8 and 8 <= level["tokens"] <= 8 * 16 and level["seconds"] > 0
        assert level["tokens_per_second"] == pytest.approx(level["tokens"] / level["seconds"])
        assert level["requests_per_second"] == pytest.approx(8 / level["seconds"])
        assert 0 < level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"]
        assert 8 <= level["responses"] <= level["tokens"]  # responses with tokens: one or more each
        assert level["tokens_per_response"]["mean"] == pytest.approx(level["tokens"] / level["responses"])
        assert 0 <= level["response_gap_ms"]["p50"] <= level["response_gap_ms"]["p99"]
        steps = level["server_steps"]  # the server's own decode-step counters over the level
        assert steps["steps"] > 0 and steps["mean_step_ms"] > 0
        assert 1.0 <= steps["mean_rows"] <= level["concurrency"]
        assert 0 <= steps["admit_steps"] <= min(8, steps["steps"])  # each of the 8 requests is admitted once
        assert (steps["decode_only_step_ms"] is None) == (steps["admit_steps"] == steps["steps"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tokens/s" in capsys.readouterr().out


def test_http_and_openai_streams_too(triton_server, tmp_path):
    """The same seeded requests through each protocol: no errors, the same number of tokens."""
    tokens = {}
    for protocol in ("grpc", "http", "openai"):
        report = tmp_path / f"{protocol}.json"
        assert main(["--url", triton_server.url, "--grpc-url", triton_server.grpc_url, "--protocol", protocol,
                     "--openai-url", triton_server.openai_url.removesuffix("/v1"), "--concurrency", "2",
                     "--requests", "4", "--json", str(report)]) == 0
        data = json.loads(report.read_text())
        assert data["errors"] == 0 and data["protocol"] == protocol
        tokens[protocol] = data["levels"][0]["tokens"]
    assert len(set(tokens.values())) == 1 and tokens["grpc"] > 4, tokens


def test_clients_spread_over_worker_processes_give_the_tokens_of_one_process(triton_server, tmp_path):
    """--workers 2 runs the clients in two processes; --requests-per-client sizes each level. The
    workload is seeded and every request is checked the same way, so the token counts agree."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    common = ["--url", triton_server.url, "--grpc-url", triton_server.grpc_url, "--concurrency", "2,4",
              "--requests-per-client", "2", "--max-new-tokens", "12", "--json"]
    assert main(common + [str(one)]) == 0 and main(common + [str(two), "--workers", "2"]) == 0
    single, spread = json.loads(one.read_text())["levels"], json.loads(two.read_text())["levels"]
    assert [level["requests"] for level in spread] == [4, 8]
    assert [level["tokens"] for level in spread] == [level["tokens"] for level in single]
    assert all(level["errors"] == 0 for level in spread)


def test_failed_requests_are_named_on_stderr_and_json_to_stdout_stays_json(triton_server, capsys):
    """A gRPC port where nothing listens: every request fails, exit 1, one error line with the count;
    no step counters at --metrics-url: one note; with --json - stdout holds only the report."""
    grpc, metrics = free_ports(2)
    code = main(["--url", triton_server.url, "--grpc-url", f"127.0.0.1:{grpc}", "--metrics-url", f"127.0.0.1:{metrics}",
                 "--concurrency", "1", "--requests", "2", "--timeout", "20", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["errors"] == 2
    lines = err.strip().splitlines()
    assert lines[0] == (f"loadtest: note: could not read decode-step counters from 127.0.0.1:{metrics} around this "
                        "level; its server rows per step and step time are left out")
    assert lines[-1].startswith("loadtest: error: 2 of 2 requests failed (e.g. ") and "Traceback" not in err


def test_no_server_is_one_error_line_after_the_bounded_wait(capsys):
    import time

    (port,) = free_ports(1)
    started = time.monotonic()
    assert main(["--url", f"http://127.0.0.1:{port}", "--requests", "1", "--wait", "0.5"]) == 2
    assert 0.5 <= time.monotonic() - started < 10
    assert_one_line_error(capsys, "loadtest", f"no server answers at http://127.0.0.1:{port} after 0.5 s; start one with serve")


def test_a_server_whose_generate_is_not_ready_is_named(capsys):
    """A server that answers HTTP but not with a ready generate (here: a bare HTTP server that
    answers 501 to everything) is told apart from no server at all."""
    import http.server

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["--url", url, "--requests", "1", "--wait", "0.3"]) == 2
    finally:
        server.shutdown()
    assert_one_line_error(capsys, "loadtest", f"the server at {url} answers but its generate model is not ready after 0.3 s")


def test_several_urls_spread_the_clients_over_several_servers(triton_server, serving_graph, tmp_path):
    """Two real servers on loopback: clients alternate between them, every request succeeds, and
    both servers decoded (their own step counters moved)."""
    from triton_process import ServeProcess

    (tmp_path / "second").mkdir()
    second = ServeProcess(serving_graph, tmp_path / "second")
    try:
        servers = (triton_server, second)
        before = [server.metric("rotary_generate_steps_total") for server in servers]
        report = tmp_path / "two.json"
        assert main(["--url", f"{triton_server.url},{second.url}", "--protocol", "http", "--concurrency", "4",
                     "--requests", "8", "--max-new-tokens", "8", "--json", str(report)]) == 0
        data = json.loads(report.read_text())
        assert data["servers"] == 2 and data["errors"] == 0 and data["levels"][0]["requests"] == 8
        after = [server.metric("rotary_generate_steps_total") for server in servers]
        assert all(a > b for a, b in zip(after, before)), (before, after)
    finally:
        assert second.terminate() == 0
    assert second.leftovers() == ([], [])


def test_step_summary_splits_off_admitting_steps_and_reads_older_servers_too(monkeypatch):
    from runtime.commands import loadtest

    before = {"rotary_generate_steps_total": 10, "rotary_generate_step_rows_total": 100,
              "rotary_generate_step_seconds_total": 0.010, "rotary_generate_admit_steps_total": 2,
              "rotary_generate_admit_step_seconds_total": 0.004}
    after = {"rotary_generate_steps_total": 20, "rotary_generate_step_rows_total": 400,
             "rotary_generate_step_seconds_total": 0.025, "rotary_generate_admit_steps_total": 4,
             "rotary_generate_admit_step_seconds_total": 0.008}
    summary = loadtest.step_summary(before, after)
    assert summary["steps"] == 10 and summary["mean_rows"] == 30 and summary["mean_step_ms"] == pytest.approx(1.5)
    assert summary["admit_steps"] == 2 and summary["decode_only_step_ms"] == pytest.approx((0.015 - 0.004) / 8 * 1e3)
    old = {key: value for key, value in after.items() if "admit" not in key}  # a server before the admit counters
    older = loadtest.step_summary({key: value for key, value in before.items() if "admit" not in key}, old)
    assert older["steps"] == 10 and older["admit_steps"] is None and older["decode_only_step_ms"] is None
    servers = {"a": after, "b": old}  # two servers, one older: only the counters both have are summed
    monkeypatch.setattr("runtime.serving.clients.read_step_counters", lambda address: servers[address])
    assert loadtest.summed_counters(["a", "b"]) == {key: 2 * value for key, value in old.items()}
