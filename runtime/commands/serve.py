"""`serve`: a real Triton server on this machine, streaming `generate` with in-flight batching."""
from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import tempfile
from pathlib import Path

from .common import (ArgumentParser, Files, add_limit_arguments, add_model_arguments, gpu_selection, limit_changes,
                     model_files, model_request, positive_float, run_main, write_json)

FRONT_END_STOP_S = 10  # after generate has drained, how long the OpenAI front end may take to exit
# uvicorn's own grace for open streams, beyond --exit-timeout: longer than generate's stop can take (unload
# requests asked again, the drain, the decode processes' stop), so uvicorn never cuts a stream just before
# generate fails it with the retry message (the client then saw a bare connection error); serve itself ends
# the front end FRONT_END_STOP_S after tritonserver has stopped
FRONT_END_GRACE_S = 30


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="serve",
        description="Start the Triton Inference Server bundled with nvidia-pytriton on this machine and serve "
                    "`generate`: streaming over HTTP (POST /v2/models/generate/generate_stream, server-sent "
                    "events) and gRPC (tritonclient stream_infer), requests joining and leaving the running "
                    "batch between decode steps, readiness at /v2/health/ready, Prometheus metrics. SIGTERM or "
                    "Ctrl-C stops accepting, lets running streams finish (within --exit-timeout) and exits 0.",
    )
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="a repository from export-triton, an .onnx graph (best --static-cache N; --with-past "
                             "and plain graphs are served too, slower) or "
                             "an engine; without it, the model flags' weights are written as a static-cache graph")
    parser.add_argument("--host", default="127.0.0.1", metavar="HOST",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, metavar="N", help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, metavar="N", help="gRPC port (default: --port + 1, i.e. 8001)")
    parser.add_argument("--metrics-port", type=int, metavar="N", help="metrics port (default: --port + 2, i.e. 8002)")
    parser.add_argument("--openai-port", type=int, metavar="N",
                        help="port of the OpenAI-compatible API (/v1/completions, /v1/models); 0 turns it off "
                             "(default: --port + 3, i.e. 8003)")
    parser.add_argument("--openai-host", default="127.0.0.1", metavar="HOST",
                        help="address the OpenAI-compatible API binds (default 127.0.0.1); Triton's own ports stay "
                             "on --host, so this can be the only public surface")
    parser.add_argument("--openai-workers", type=int, metavar="N",
                        help="worker processes of the OpenAI-compatible API (uvicorn's, sharing the port; default: "
                             "one per four cores, at most 4)")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require `Authorization: Bearer KEY` on /v1/* (default: the ROTARY_API_KEY "
                             "environment variable; none on loopback)")
    parser.add_argument("--allow-no-key", action="store_true",
                        help="serve the OpenAI-compatible API on a non-loopback --openai-host without a key")
    parser.add_argument("--served-model-name", default="rotary", metavar="NAME",
                        help="the model name /v1/models lists and requests must name (default rotary)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"],
                        help="where generate decodes: auto (CUDA when present; default), cpu or cuda")
    add_limit_arguments(parser)
    parser.add_argument("--generate-instances", type=int, metavar="N",
                        help="generate processes, each decoding --max-rows rows with its own decoder: their "
                             "per-token Python work (sampling, one response per token) then runs in parallel "
                             "(default 1, or the repository's)")
    parser.add_argument("--gpus", type=gpu_selection, metavar="all|N|LIST",
                        help="decode on these GPUs, --generate-instances on each, each GPU with its own decoder, "
                             "rows and CUDA graphs (Triton spreads requests across them): all, the first N, or ids "
                             "such as 0,2 or device=1; a GPU this machine does not have is refused before anything "
                             "starts (default: one decoder on the default device)")
    add_model_arguments(parser, "without MODEL")
    parser.add_argument("--max-cache", type=int, metavar="N",
                        help="without MODEL: static cache per row (default max prompt + max new tokens)")
    parser.add_argument("--dtype", choices=["fp32", "fp16"],
                        help="without MODEL: graph precision (default fp16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--exit-timeout", type=int, default=30, metavar="S",
                        help="on SIGTERM, how long the stop may take: streams run on until 5 s before it ends, then are "
                             "failed with a retry message (default 30)")
    parser.add_argument("--start-timeout", type=positive_float, default=300.0, metavar="S",
                        help="how long starting the server and loading the model may take (default 300)")
    parser.add_argument("--log", metavar="PATH", help="tritonserver's log (default: a temporary file, removed after a clean stop and kept "
                             "when serve fails, which its error names)")
    parser.add_argument("--json", metavar="PATH", help="write the endpoints as JSON once the model is ready")
    return parser


def _check(args: argparse.Namespace) -> None:
    from runtime.serving.tritonserver import ServerError

    from runtime.serving.openai_server import is_loopback

    ports = {"--port": args.port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    if args.openai_port:
        ports["--openai-port"] = args.openai_port
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            raise ServerError(f"{flag} must be a port number 1-65535{' (or 0: off)' if flag == '--openai-port' else ''}, "
                              f"got {port}")
    if len(set(ports.values())) < len(ports):
        raise ServerError(f"{', '.join(ports)} must differ")
    if args.openai_port and not is_loopback(args.openai_host) and not args.api_key and not args.allow_no_key:
        raise ServerError(f"--openai-host {args.openai_host} is reachable from other machines: set --api-key KEY "
                          f"(or ROTARY_API_KEY), or pass --allow-no-key to serve it without one")
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if args.openai_port and missing:
        raise ServerError(f"the OpenAI-compatible API needs {' and '.join(missing)}, not installed here: install the "
                          f"serve extra (pip install -e '.[serve]'), or pass --openai-port 0 to serve Triton's protocols only")
    if args.openai_workers < 1:
        raise ServerError(f"--openai-workers must be at least 1, got {args.openai_workers}")
    if args.exit_timeout < 1 or args.start_timeout <= 0:
        raise ServerError("--exit-timeout and --start-timeout must be positive")
    if args.generate_instances is not None and args.generate_instances < 1:
        raise ServerError(f"--generate-instances must be at least 1, got {args.generate_instances}")
    if args.max_cache is not None and args.max_cache < 2:
        raise ServerError(f"--max-cache must be at least 2, got {args.max_cache}")
    unused = [flag for flag, value in (("--max-cache", args.max_cache), ("--dtype", args.dtype),
                                       ("--checkpoint", args.checkpoint), ("--config", args.config),
                                       ("--preset", args.preset)) if value is not None]
    if args.model and unused:
        raise ServerError(f"{unused[0]} is for serving weights without MODEL, and MODEL {args.model} is given; drop "
                          f"{unused[0]} (MODEL carries its own weights, precision and cache)")
    if args.max_cache is not None and not args.model:  # the limits must fit before the graph is written
        from runtime.serving.limits import Limits

        given = limit_changes(args)
        Limits().replace(**given).fitted(args.max_cache, set(given))
    if args.device == "cuda" and not _cuda():
        raise ServerError("--device cuda: PyTorch sees no CUDA GPU on this machine; use --device cpu (or auto)")
    if args.gpus is not None:
        from runtime.serving.gpus import resolve_gpus

        if args.device == "cpu":
            raise ServerError("--gpus places generate on GPUs; drop --device cpu (or --gpus)")
        args.gpus = resolve_gpus(args.gpus, _gpu_count())
    elif args.model and (Path(args.model) / "generate" / "config.pbtxt").is_file():
        from runtime.serving.gpus import placed_gpus, resolve_gpus

        placed = placed_gpus((Path(args.model) / "generate" / "config.pbtxt").read_text())
        if placed is not None:
            resolve_gpus(placed, _gpu_count(), f"{args.model} (written by export-triton --gpus)",
                         "serve it on a GPU machine, or export a repository without --gpus for this one")


def _check_ports_free(args: argparse.Namespace) -> None:
    """Each port serve listens on, free before anything starts: on a port another server holds,
    Triton's requests reach that server instead, and the error names its refusal, not the port."""
    import errno
    import socket

    from runtime.serving.tritonserver import ServerError

    ports = [("--port", args.host, args.port), ("--grpc-port", args.host, args.grpc_port),
             ("--metrics-port", args.host, args.metrics_port)]
    if args.openai_port:
        ports.append(("--openai-port", args.openai_host, args.openai_port))
    for flag, host, port in ports:
        try:
            addresses = {info[:3] + (info[4],) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except OSError:
            continue  # a host that does not resolve is the server's to report as it starts
        for family, kind, protocol, address in addresses:  # every address the server binds (gRPC binds them all)
            try:
                with socket.socket(family, kind, protocol) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed port's TIME_WAIT is free
                    probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ServerError(f"{flag} {port} is in use on {host} (another server, perhaps an earlier "
                                      f"serve); stop it, or pass another {flag}") from None
                # anything else (an address not on this machine, say) is the server's to report as it starts


def public_triton_warning(host: str) -> str | None:
    """What to say when Triton's own ports, which have no authentication, face other machines."""
    from runtime.serving.openai_server import is_loopback

    if is_loopback(host):
        return None
    return (f"serve: warning: --host {host} opens Triton's HTTP, gRPC and metrics ports to other machines, and "
            "they have no authentication (anyone who reaches them can run inference); keep --host on loopback "
            "and publish only the OpenAI-compatible API (--openai-host with --api-key), or put an "
            "authenticating proxy in front")


def _serve(args: argparse.Namespace) -> int:
    from runtime.serving.tritonserver import Endpoints

    args.api_key = args.api_key or os.environ.get("ROTARY_API_KEY") or None
    # the ports follow --port, as loadtest and the OpenAI API expect them to
    args.grpc_port = args.port + 1 if args.grpc_port is None else args.grpc_port
    args.metrics_port = args.port + 2 if args.metrics_port is None else args.metrics_port
    if args.openai_port is None:
        args.openai_port = args.port + 3
    if args.openai_workers is None:
        from runtime.serving.openai_server import default_workers

        args.openai_workers = default_workers()
    _check(args)
    _check_ports_free(args)
    if (warning := public_triton_warning(args.host)) is not None:
        print(warning, file=sys.stderr, flush=True)
    endpoints = Endpoints(args.host, args.port, args.grpc_port, args.metrics_port)
    front: list = []  # the OpenAI-compatible server, once generate is ready
    from runtime.serving.signal_flag import SignalFlag

    stop = SignalFlag()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log = Path(args.log) if args.log else None
    if log is None:  # outside the work folder: an error that names it must find it after serve exits
        handle, name = tempfile.mkstemp(prefix="rotary-tritonserver-", suffix=".log")
        os.close(handle)
        log = Path(name)
    clean = False
    try:
        _serve_on(args, endpoints, front, stop, log)
        clean = True
    finally:
        if not args.log and (clean or not log.stat().st_size):  # kept only when it explains a failure
            log.unlink(missing_ok=True)
    _say("serve: stopped")
    return 0


def _serve_on(args: argparse.Namespace, endpoints, front: list, stop, log: Path) -> None:
    from runtime.serving.service import repository_for, run_server
    from runtime.serving.stale import remove_killed_servers_folders, serve_folder_prefix

    remove_killed_servers_folders()  # a model's copy, say, that a serve killed outright left
    with tempfile.TemporaryDirectory(prefix=serve_folder_prefix()) as work:
        precision = args.dtype or ("fp16" if _cuda() else "fp32")
        model = args.model or _write_static_graph(args, Path(work), precision)
        repository, override = repository_for(model, Path(work), limit_changes(args), args.device, _say,
                                              args.generate_instances, args.gpus)

        def ready() -> None:
            where = endpoints.describe()
            if args.openai_port:
                front.append(_openai(args, where))
                where["openai"] = front[0].where
            _say(f"serve: generate ready on {where['http']} (gRPC {where['grpc']}, metrics {where['metrics']}"
                 f"{', OpenAI API ' + where['openai'] if 'openai' in where else ''}); health: {where['health']}")
            if args.json:
                write_json(args.json, {"ready": True, **where, "repository": str(repository)})

        try:  # at a stop the front end refuses new requests first; its streams end as generate drains
            run_server(repository, endpoints, Path(work), override, stop, ready, args.exit_timeout,
                       args.start_timeout, log, log=_say, before_stop=lambda graceful: [
                           server.stop_accepting() if graceful else server.stop(0) for server in front])
        finally:
            for server in front:
                server.stop(FRONT_END_STOP_S)


def _write_static_graph(args: argparse.Namespace, work: Path, precision: str) -> str:
    """Serving weights: write them as a static-cache graph sized for the limits (or --max-cache)."""
    from export.graphs import export_graph
    from models.graph_metadata import STATIC_CACHE
    from models.progress import phase
    from runtime.serving.limits import Limits

    source = model_request(args).resolve()
    limits = Limits().replace(**limit_changes(args))
    cache = args.max_cache or limits.max_prompt_tokens + limits.max_new_tokens
    path = work / "model-static.onnx"
    with phase(_say, "writing the static-cache graph",
               start=f"serve: writing {source.description} as a {cache}-token static-cache graph ({precision})"):
        export_graph(source.weights, path, STATIC_CACHE, precision, max_cache=cache, record=source.record,
                     log=lambda _: None)
    return str(path)


def _openai(args: argparse.Namespace, where: dict):
    """Start the OpenAI-compatible API in front of the ready `generate`."""
    from runtime.serving.openai_server import OpenAIProcess, generate_facts

    vocab_size, capacity = generate_facts(where["http"])
    settings = {"grpc_url": where["grpc"], "model": args.served_model_name, "vocab_size": vocab_size,
                "context_length": capacity, "api_key": args.api_key}
    return OpenAIProcess(settings, args.openai_host, args.openai_port, args.openai_workers,
                         args.exit_timeout + FRONT_END_GRACE_S).start()


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _say(message: str) -> None:
    print(message, flush=True)


def _files(args: argparse.Namespace) -> Files:
    return Files(inputs={"MODEL": args.model, **model_files(args)}, outputs={"--json": args.json, "--log": args.log})


def main(argv: list[str] | None = None) -> int:
    return run_main(_serve, build_parser(), argv, _files)


if __name__ == "__main__":
    raise SystemExit(main())
