"""`package-edge`: an exported graph -> a folder to copy to a Jetson board and build there."""
from __future__ import annotations

import argparse

from .common import ArgumentParser, Files, log_to, positive_float, run_main, write_json


def build_parser() -> argparse.ArgumentParser:
    from runtime.edge.targets import JETPACKS, TARGETS

    parser = ArgumentParser(
        prog="package-edge",
        description="Check an exported graph for a Jetson board's TensorRT, size its optimisation profile and "
                    "builder workspace to the board's memory, and write a folder to copy there: the graph, "
                    "build.sh (build-engine, or trtexec), trtexec.txt, the parity commands, README.md and "
                    "manifest.json (target, JetPack, TensorRT, CUDA, compute capability, sha256 of every file). "
                    "A model that cannot fit is refused with its memory budget.",
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="a portable graph written by export-model (--with-past "
                                                             "for decoding; --quantize int8|int4 to save memory)")
    parser.add_argument("--target", required=True, choices=list(TARGETS), help="the board")
    parser.add_argument("--jetpack", required=True, choices=list(JETPACKS),
                        help="the JetPack on the board: " + "; ".join(
                            f"{j.version}: TensorRT {j.tensorrt}, CUDA {j.cuda}" for j in JETPACKS.values()))
    parser.add_argument("--batch", metavar="MIN:OPT:MAX", help="batch range (default: the graph's, shrunk to fit)")
    parser.add_argument("--seq", metavar="MIN:OPT:MAX", help="sequence range (default: the graph's, shrunk to fit)")
    parser.add_argument("--past", metavar="MIN:OPT:MAX",
                        help="cached-length range for graphs with past (default: the graph's, shrunk to fit)")
    parser.add_argument("--workspace", type=int, metavar="MiB",
                        help="builder workspace (default: 1024, halved down to 128 until the budget fits)")
    parser.add_argument("--usable-gib", type=positive_float, metavar="GiB",
                        help="memory the engine may use on the board (default: the module's memory minus 2.6 GiB "
                             "for carve-outs and a headless OS; measure with free -m)")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="the folder to write (must not exist, or be empty); written beside it and renamed")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="write the manifest to PATH, or to stdout if no PATH is given")
    return parser


def _package(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from runtime.edge.budget import GIB
    from runtime.edge.package import package_edge

    from runtime.edge.targets import EdgeError

    if args.workspace is not None and not 1 <= args.workspace <= 1 << 20:
        raise EdgeError(f"--workspace must be from 1 to {1 << 20} MiB, got {args.workspace}")
    log = log_to(args.json == "-")
    flags = {"batch": args.batch, "sequence": args.seq, "past_sequence": args.past}
    plan = package_edge(args.model, args.target, args.jetpack, args.output, flags, args.workspace, args.usable_gib)
    budget = plan.budget
    log(f"package-edge: {plan.model.name} for {plan.target.module}, JetPack {plan.jetpack.version} "
        f"(TensorRT {plan.jetpack.tensorrt}): {budget.axes.describe()}, workspace {budget.workspace_mib} MiB, "
        f"{budget.total / GIB:.2f} of {budget.usable / GIB:.2f} GiB")
    for warning in plan.check.warnings:
        log(f"warning: {warning}")
    log(f"wrote {args.output}: bash build.sh on the board, then: {plan.parity_commands()[0]}")
    if args.json:
        write_json(args.json, json.loads((Path(args.output) / "manifest.json").read_text()))
    return 0


def _files(args: argparse.Namespace) -> Files:
    return Files(inputs={"MODEL.onnx": args.model}, outputs={"--json": args.json}, folders={"--output": args.output})


def main(argv: list[str] | None = None) -> int:
    return run_main(_package, build_parser(), argv, _files)


if __name__ == "__main__":
    raise SystemExit(main())
