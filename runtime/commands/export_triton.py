"""`export-triton`: a Triton model repository from a graph or an engine, with a streaming `generate` model."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import (ArgumentParser, Files, add_limit_arguments, gpu_selection, limit_changes, log_to, run_main,
                     write_json)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="export-triton",
        description="Write a Triton Inference Server model repository: the model as Triton's own backends serve "
                    "it (onnxruntime_onnx for a graph, tensorrt_plan for an engine, one instance group per "
                    "optimization profile), with dynamic batching, and a decoupled python-backend model "
                    "`generate` that streams one response per token from the toolkit's decoder with in-flight "
                    "batching. Run it with `serve REPO` or in NVIDIA's Triton container (see docs/deployment.md).",
    )
    parser.add_argument("model", metavar="MODEL", help="an .onnx graph from export-model, or an .engine/.plan from "
                                                       "build-engine (its .json sidecar beside it)")
    parser.add_argument("--output", "-o", required=True, metavar="REPO", help="the repository folder to create")
    parser.add_argument("--name", default="rotary", help="the model entry's name (default rotary)")
    parser.add_argument("--kind", choices=["gpu", "cpu"], default="gpu",
                        help="where Triton runs the model entry (default gpu; engines need gpu)")
    parser.add_argument("--instances", type=int, default=1, metavar="N",
                        help="model entry instances per GPU, or per profile for engines (default 1)")
    parser.add_argument("--generate-instances", type=int, default=1, metavar="N",
                        help="generate processes, each with its own decoder of --max-rows rows (default 1)")
    parser.add_argument("--gpus", type=gpu_selection, metavar="all|N|LIST",
                        help="run generate on GPUs, --generate-instances on each, each GPU with its own decoder and "
                             "CUDA graphs (Triton instance_group KIND_GPU; requests spread across them): all, the first "
                             "N, or ids such as 0,2 or device=1 (default: one decoder on the server's default device)")
    parser.add_argument("--max-batch-size", type=int, metavar="N",
                        help="the model entry's max_batch_size (default: the graph's batch axis maximum, or the "
                             "largest batch every engine profile takes; 0 disables batching)")
    parser.add_argument("--queue-delay-us", type=int, default=100, metavar="US",
                        help="dynamic batching: how long a request may wait for others (default 100)")
    parser.add_argument("--decoder", metavar="GRAPH",
                        help="the graph `generate` decodes with, if not MODEL: e.g. an export-model --static-cache "
                             "graph (CUDA graphs on the GPU) beside an engine; same weights required")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where `generate` decodes: auto (CUDA when the server has it, else CPU; default)")
    parser.add_argument("--python-env", metavar="TAR",
                        help="a conda-pack archive with this toolkit and its dependencies for Triton's python "
                             "backend (copied in and named by EXECUTION_ENV_PATH)")
    add_limit_arguments(parser)
    capacity_help = {"max_prompt_tokens": "longest prompt accepted (default: 256, or half the decoder's capacity "
                                          "when that is less)",
                     "max_new_tokens_limit": "most new tokens a request may ask for (default: 256, or what the "
                                             "decoder's capacity leaves after the longest prompt when that is less)"}
    for action in parser._actions:
        action.help = capacity_help.get(action.dest, action.help)
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write what was written as JSON to PATH, or stdout if no PATH is given")
    return parser


def _is_gzip_tar(path: Path) -> bool:
    """Triton's python backend unpacks EXECUTION_ENV_PATH as a gzip'd tar: check the first member."""
    import tarfile

    try:
        with tarfile.open(path, "r:gz") as archive:
            return archive.next() is not None
    except (tarfile.TarError, OSError, EOFError):
        return False


def _export(args: argparse.Namespace) -> int:
    from runtime.serving.repository import RepositoryError, RepositoryOptions, export_repository

    log = log_to(args.json == "-")
    int32 = 2**31 - 1  # what Triton's model config schema holds
    for flag, value, low, high in (("--instances", args.instances, 1, 1024),
                                   ("--generate-instances", args.generate_instances, 1, 1024),
                                   ("--max-batch-size", args.max_batch_size, 0, int32),
                                   ("--queue-delay-us", args.queue_delay_us, 0, int32)):
        if value is not None and not low <= value <= high:
            raise RepositoryError(f"{flag} must be from {low} to {high}, got {value}")
    if not Path(args.model).is_file():
        raise RepositoryError(f"model not found: {args.model}; pass an .onnx graph or an engine")
    limits = _limits(args, log)
    options = RepositoryOptions(args.name, args.kind, args.instances, args.max_batch_size, args.queue_delay_us,
                                limits, args.device,
                                Path(args.decoder) if args.decoder else None,
                                Path(args.python_env) if args.python_env else None, args.generate_instances,
                                args.gpus)
    for flag, path in (("--decoder", options.decoder), ("--python-env", options.python_env)):
        if path is not None and not path.is_file():
            state = "is a directory; give the file" if path.is_dir() else "not found; check the path"
            raise RepositoryError(f"{flag} {path} {state}")
    if options.python_env is not None and not _is_gzip_tar(options.python_env):
        raise RepositoryError(f"--python-env {options.python_env} is not a .tar.gz archive; make one with "
                              "conda-pack (conda pack -o env.tar.gz)")
    report = export_repository(args.model, args.output, options)
    log(f"export-triton: wrote {report['repository']}: {args.name} ({report['models'][args.name]}, max_batch_size "
        f"{report['max_batch_size']}) and generate (decoupled, decodes {report['decoder_model']})")
    if args.json:
        write_json(args.json, report)
    return 0


def _limits(args: argparse.Namespace, log):
    """The limit flags given; the prompt and new-token limits not given fit the decoder's capacity
    (Limits.fitted), so a small static cache works as is."""
    from models.graph_metadata import read_graph_metadata
    from runtime.decoding.open import read_model_metadata
    from runtime.serving.limits import Limits
    from runtime.serving.repository import decoder_capacity

    given = limit_changes(args)
    limits = Limits().replace(**given)
    decoder = Path(args.decoder) if args.decoder else Path(args.model)
    if not decoder.is_file():
        return limits  # reported by name below
    capacity = decoder_capacity(read_graph_metadata(decoder) if args.decoder else read_model_metadata(decoder))
    fitted = limits.fitted(capacity, set(given))
    if fitted != limits:
        log(f"export-triton: the decoder holds {capacity} tokens per row: --max-prompt-tokens "
            f"{fitted.max_prompt_tokens}, --max-new-tokens-limit {fitted.max_new_tokens}")
    return fitted


def _files(args: argparse.Namespace) -> Files:
    return Files(inputs={"MODEL": args.model, "--decoder": args.decoder, "--python-env": args.python_env},
                 outputs={"--json": args.json}, folders={"--output": args.output})


def main(argv: list[str] | None = None) -> int:
    return run_main(_export, build_parser(), argv, _files)


if __name__ == "__main__":
    raise SystemExit(main())
