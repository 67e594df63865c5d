"""`loadtest`: concurrent streaming clients against a running `serve` (or any Triton serving generate)."""
from __future__ import annotations

import argparse
import http.client
import os
import sys
import time

from models.errors import ToolkitError

from .common import (ArgumentParser, int_list, log_to, non_negative_float, non_negative_int, positive_float,
                     positive_int, run_main, write_json)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="loadtest",
        description="Run N concurrent streaming clients (tritonclient gRPC streams, HTTP generate_stream, or "
                    "serve's OpenAI-compatible /v1/completions) against a server's `generate` with a seeded mix of prompt lengths, output lengths and "
                    "settings (within the limits the server's model config declares). Reports requests/s, "
                    "tokens/s, time to first token, inter-token latency per token as a client sees it (tokens "
                    "that arrive in one response are 0 apart), time between responses and tokens per "
                    "response (p50, p99), the server's rows per step and step time, and errors per "
                    "concurrency level. Exit 1 when any request failed.",
    )
    parser.add_argument("--url", required=True, type=url_list, metavar="URL[,URL...]",
                        help="the server's HTTP address, e.g. http://127.0.0.1:8000; several, comma-separated, load "
                             "several servers at once: client i talks to server i modulo their number, and the "
                             "server figures add up all of them (each server's gRPC, metrics and OpenAI ports are "
                             "its HTTP port + 1, + 2 and + 3, as serve lays them out)")
    parser.add_argument("--concurrency", type=int_list, default=[8], metavar="N[,N...]",
                        help="concurrent clients; several levels (1,8,32) run one after another (default 8)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--requests", type=positive_int, metavar="M", help="requests per level (default 64)")
    parser.add_argument("--protocol", choices=["grpc", "http", "openai"], default="grpc",
                        help="grpc (tritonclient streams; default), http (Triton's generate_stream) or openai "
                             "(serve's /v1/completions, streamed); the same seeded requests and tokens in each")
    parser.add_argument("--grpc-url", metavar="HOST:PORT",
                        help="the gRPC address (default: the URL's host, port + 1 as Triton lays them out)")
    parser.add_argument("--openai-url", metavar="URL",
                        help="the OpenAI-compatible API (default: the URL's host, port + 3, as serve lays them out)")
    parser.add_argument("--api-key", metavar="KEY",
                        help="the OpenAI-compatible API's key (default: the ROTARY_API_KEY environment variable)")
    parser.add_argument("--metrics-url", metavar="HOST:PORT",
                        help="Triton's metrics address, read before and after each level for the server's decode "
                             "steps: mean rows per step and mean step time (default: the URL's host, port + 2)")
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=64, metavar="N",
                        help="longest prompt sent (default 64, at most the server's limit)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                        help="most tokens asked for (default 64, at most the server's limit)")
    load.add_argument("--requests-per-client", type=positive_int, metavar="K",
                      help="K requests per client at each level instead of --requests (steady load at every level)")
    parser.add_argument("--workers", type=positive_int, default=1, metavar="P",
                        help="spread the clients over P processes, so one Python process receiving every "
                             "response does not cap the rate (default 1)")
    parser.add_argument("--wait", type=non_negative_float, default=30.0, metavar="S",
                        help="wait up to S seconds for the generate model to be ready (a server still loading it); "
                             "0: do not wait (default 30)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="workload seed (default 0)")
    parser.add_argument("--timeout", type=positive_float, default=120.0, metavar="S", help="per request (default 120)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON (`errors`: failed requests); - for "
                                                       "stdout, the progress lines then go to stderr")
    parser.add_argument("--plot", metavar="PNG", help="chart latency against concurrency")
    return parser


def wait_until_ready(url: str, seconds: float) -> None:
    """Until the generate model answers ready at `url`, at most `seconds`; then say what is wrong."""
    from runtime.serving.requests import GENERATE
    from runtime.serving.tritonserver import http_status

    deadline, answered = time.monotonic() + seconds, False
    while True:
        status = http_status(f"{url.rstrip('/')}/v2/models/{GENERATE}/ready")
        answered = answered or status is not None
        if status == 200:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    if answered:
        raise ToolkitError(f"the server at {url} answers but its {GENERATE} model is not ready after {seconds:g} s; "
                           "wait for serve's 'generate ready' line, or raise --wait")
    raise ToolkitError(f"no server answers at {url} after {seconds:g} s; start one with serve")


def server_limits(url: str) -> dict[str, int]:
    """The generate model's declared limits, vocabulary and capacity, read from its config."""
    from runtime.serving.clients import get_json
    from runtime.serving.requests import GENERATE

    try:
        config = get_json(url, f"/v2/models/{GENERATE}/config")
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise ToolkitError(f"no Triton server with a loaded {GENERATE} model answers at {url} ({error}); "
                           "start one with serve") from None
    values = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
    return {key: int(value) for key, value in values.items() if value.isdigit()}


def url_list(text: str) -> list[str]:
    """--url's comma-separated list of http(s) addresses."""
    from urllib.parse import urlsplit

    urls = [part.strip() for part in text.split(",")]
    bad = [url for url in urls if urlsplit(url).scheme not in ("http", "https")]
    if bad:
        raise argparse.ArgumentTypeError(f"must be http:// or https:// addresses separated by commas, got "
                                         f"{bad[0] or 'an empty entry'!r} in {text!r}")
    seen = {url.rstrip("/") for url in urls}
    if len(seen) < len(urls):  # a server listed twice would have its counters summed twice
        raise argparse.ArgumentTypeError(f"names a server more than once: {text!r}; list each server once")
    return urls


def _checked(args: argparse.Namespace) -> None:
    from urllib.parse import urlsplit

    if args.openai_url is not None and urlsplit(args.openai_url).scheme not in ("http", "https"):
        raise ToolkitError(f"--openai-url must be an http:// or https:// address, got {args.openai_url!r}")
    overrides = [flag for flag, value in (("--grpc-url", args.grpc_url), ("--openai-url", args.openai_url),
                                          ("--metrics-url", args.metrics_url)) if value is not None]
    if len(args.url) > 1 and overrides:
        raise ToolkitError(f"{overrides[0]} names one server's address; with several --url each server's ports "
                           "follow its HTTP port (drop it)")


def _client(args: argparse.Namespace, url: str, vocab_size: int) -> tuple:
    """What runtime.serving.loadtest.make_client takes for one server."""
    from runtime.serving.clients import split_url

    host, port = split_url(url, 8000)
    if args.protocol == "openai":
        return ("openai", args.openai_url or f"http://{host}:{port + 3}", vocab_size,
                args.api_key or os.environ.get("ROTARY_API_KEY") or None)
    return ("grpc", args.grpc_url or f"{host}:{port + 1}") if args.protocol == "grpc" else ("http", url)


def _limits(urls: list[str], wait: float) -> dict[str, int]:
    """Each server ready, and the limits every one of them accepts."""
    limits: dict[str, int] = {}
    for url in urls:
        wait_until_ready(url, wait)
        for key, value in server_limits(url).items():
            limits[key] = min(value, limits.get(key, value))
    return limits


def _loadtest(args: argparse.Namespace) -> int:
    from runtime.serving.clients import split_url
    from runtime.serving.loadtest import Workload, plot_levels, run_level
    from runtime.serving.metrics import PUBLISH_S

    _checked(args)
    log = log_to(args.json == "-")
    limits = _limits(args.url, args.wait)
    prompt = min(args.max_prompt_tokens, limits.get("max_prompt_tokens", args.max_prompt_tokens))
    new = min(args.max_new_tokens, limits.get("max_new_tokens", args.max_new_tokens))
    if "capacity" in limits:  # prompt + new tokens must fit in a row
        prompt = min(prompt, limits["capacity"] // 2)
        new = min(new, limits["capacity"] - prompt)
    counts = [args.requests_per_client * c if args.requests_per_client else args.requests or 64
              for c in args.concurrency]
    requests = Workload(max(counts), limits.get("vocab_size", 256), prompt, new, args.seed).build()
    clients = [_client(args, url, limits.get("vocab_size", 256)) for url in args.url]
    metrics = [args.metrics_url or "{}:{}".format(host, port + 2) for host, port in
               (split_url(url, 8000) for url in args.url)]
    levels = []
    before = summed_counters(metrics)
    for concurrency, count in zip(args.concurrency, counts):
        level = run_level(requests[:count], concurrency, clients, args.timeout, args.workers)
        time.sleep(2 * PUBLISH_S)  # the server publishes its counters every PUBLISH_S
        after = summed_counters(metrics)
        if before is None or after is None:
            log(f"loadtest: note: could not read decode-step counters from {', '.join(metrics)} around this level; "
                "its server rows per step and step time are left out")
        level["server_steps"], before = step_summary(before, after), after
        levels.append(level)
        log(f"loadtest: {concurrency:4d} clients  {level['requests_per_second']:7.2f} req/s  "
            f"{level['tokens_per_second']:8.1f} tokens/s  TTFT p50 {_ms(level['ttft_ms']['p50'])} p99 "
            f"{_ms(level['ttft_ms']['p99'])}  ITL p50 {_ms(level['itl_ms']['p50'])} p99 {_ms(level['itl_ms']['p99'])}"
            f"  between responses p99 {_ms(level['response_gap_ms']['p99'])}  "
            f"{_per_response(level['tokens_per_response']['mean'])} tokens/response"
            f"  errors {level['errors']}{_steps(level['server_steps'])}")
    errors = sum(level["errors"] for level in levels)
    if args.json:
        write_json(args.json, {"url": ",".join(args.url), "servers": len(args.url), "protocol": args.protocol,
                               "prompt_tokens_max": prompt, "new_tokens_max": new, "levels": levels, "errors": errors})
    if args.plot:
        plot_levels(levels, args.plot)
    if errors:
        messages = sorted({m for level in levels for m in level["error_messages"]})
        example = next((m.strip().splitlines()[0][:200] for m in messages if m.strip()), "no message")
        print(f"loadtest: error: {errors} of {sum(counts)} requests failed (e.g. {example}); the report lists each "
              "level's errors", file=sys.stderr)
    return 1 if errors else 0


def summed_counters(addresses: list[str]) -> dict | None:
    """The servers' step counters added up; None when any server does not publish them."""
    from runtime.serving.clients import read_step_counters

    total: dict = {}
    shared = None  # the counters every server has (an older server has no admission counters)
    for address in addresses:
        counters = read_step_counters(address)
        if counters is None:
            return None
        shared = set(counters) if shared is None else shared & set(counters)
        for key, value in counters.items():
            total[key] = total.get(key, 0) + value
    return {key: value for key, value in total.items() if key in shared}


def step_summary(before: dict | None, after: dict | None) -> dict | None:
    """The server's decode steps during one level: how many, mean rows per step, mean step time; and
    (servers that count them) how many also admitted requests, their prefill in their time, and the
    mean of the steps that did not. Steps that only admitted, with no row running, are not decode steps."""
    if before is None or after is None:
        return None
    steps = after["rotary_generate_steps_total"] - before["rotary_generate_steps_total"]
    if steps <= 0:
        return None
    rows = after["rotary_generate_step_rows_total"] - before["rotary_generate_step_rows_total"]
    seconds = after["rotary_generate_step_seconds_total"] - before["rotary_generate_step_seconds_total"]
    summary = {"steps": int(steps), "mean_rows": rows / steps, "mean_step_ms": seconds / steps * 1e3,
               "admit_steps": None, "decode_only_step_ms": None}
    if "rotary_generate_admit_steps_total" in before and "rotary_generate_admit_steps_total" in after:
        admits = after["rotary_generate_admit_steps_total"] - before["rotary_generate_admit_steps_total"]
        admit_seconds = (after["rotary_generate_admit_step_seconds_total"]
                         - before["rotary_generate_admit_step_seconds_total"])
        summary["admit_steps"] = int(admits)
        if steps > admits:
            summary["decode_only_step_ms"] = (seconds - admit_seconds) / (steps - admits) * 1e3
    return summary


def _steps(summary: dict | None) -> str:
    if summary is None:
        return ""
    decode_only = summary["decode_only_step_ms"]
    return (f"  server: {summary['steps']} steps of {summary['mean_rows']:.1f} rows, {summary['mean_step_ms']:.2f} ms"
            + ("" if decode_only is None else f" ({decode_only:.2f} ms without admissions)"))


def _per_response(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _ms(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.1f} ms"


def main(argv: list[str] | None = None) -> int:
    return run_main(_loadtest, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
