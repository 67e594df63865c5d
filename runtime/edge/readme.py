"""The bundle's README: what is in the folder, what was checked, the memory budget and how to use it
on the board, with every unconfirmed fact marked."""
from __future__ import annotations

import shlex

from models.precision import precision

from ..bench.floors import decode_bytes
from .budget import FORMULA, GIB, RUNTIME_GIB
from .targets import USABLE_ASSUMPTION


def _mark(unconfirmed: bool) -> str:
    return " (unconfirmed)" if unconfirmed else ""


def _facts(plan) -> list[str]:
    target, jetpack = plan.target, plan.jetpack
    lines = [f"- board: {target.module}, {target.memory_gib:g} GB shared by CPU and GPU, "
             f"{target.bandwidth_gbs:g} GB/s{_mark('bandwidth_gbs' in target.unconfirmed)}, "
             f"{target.sms} SMs{_mark('sms' in target.unconfirmed)}, compute capability {target.compute_capability}"]
    if target.note:
        lines.append(f"- note: {target.note}")
    lines.append(f"- JetPack {jetpack.version}: L4T {jetpack.l4t}{_mark(not jetpack.confirmed('l4t'))}, "
                 f"CUDA {jetpack.cuda}{_mark(not jetpack.confirmed('cuda'))}, "
                 f"TensorRT {jetpack.tensorrt}{_mark(not jetpack.confirmed('tensorrt'))}, ONNX parser documented "
                 f"to opset {jetpack.max_opset}{_mark(not jetpack.confirmed('max_opset'))}; weak typing: "
                 f"{jetpack.weak_typing} (this bundle builds strongly typed)")
    lines += [f"- unconfirmed {name}: {why}" for name, why in jetpack.unconfirmed.items()]
    lines += [f"- source: {source}" for source in jetpack.sources]
    return lines


def _budget_table(plan) -> list[str]:
    budget = plan.budget
    rows = [f"| {name} | {value / GIB:.3f} |" for name, value in budget.lines.items()]
    return ["| line | GiB |", "| --- | --- |", *rows, f"| **total** | **{budget.total / GIB:.3f}** |",
            f"| usable on the board | {budget.usable / GIB:.3f} |"]


def _decode_floor(plan) -> str:
    config, axes = plan.metadata.config, plan.budget.axes
    context = (axes.past or axes.sequence)[2]
    seconds = decode_bytes(config, 1, context, precision(plan.metadata.precision)) / (plan.target.bandwidth_gbs * 1e9)
    return (f"Decode floor at batch 1 with a {context}-token cache: {seconds * 1e3:.2f} ms per token (every matrix "
            f"weight and the cache read once at {plan.target.bandwidth_gbs:g} GB/s; runtime/bench/floors.py).")


def bundle_readme(plan) -> str:
    metadata, check = plan.metadata, plan.check
    quantization = metadata.quantization.describe() if metadata.quantization else "none"
    warnings = [f"- WARNING: {w}" for w in check.warnings] or ["- no warnings"]
    parity = "\n".join(f"    {command}" for command in plan.parity_commands())
    return "\n".join([
        f"# {metadata.config.depth}-layer rotary transformer for {plan.target.module}, JetPack {plan.jetpack.version}",
        "",
        f"Graph `{plan.model.name}`: {metadata.kind}, precision {metadata.precision}, opset {metadata.opset}, "
        f"weight quantization: {quantization}; weights {metadata.weights.description}.",
        "",
        "## Checked for this JetPack",
        "", *_facts(plan), "", *warnings, "",
        "## Memory budget (largest profile: " + plan.budget.axes.describe()
        + f", workspace {plan.budget.workspace_mib} MiB)",
        "", *_budget_table(plan), "",
        f"Assumptions: {USABLE_ASSUMPTION}; runtime {RUNTIME_GIB} GiB for the CUDA context and libraries.",
        ("Sized to fit (workspace first, then the axes not given): " + "; ".join(plan.budget.adjusted) + "."
         if plan.budget.adjusted else "The requested profile and workspace fit as they are."),
        _decode_floor(plan), "",
        "```", FORMULA.strip(), "```", "",
        "## On the board",
        "",
        "1. Copy this folder to the board (JetPack as above). `bash build.sh` checks every file against "
        f"`manifest.json`, then builds `{plan.engine}` with `build-engine` (rotary-deploy and torch installed) "
        "or with trtexec (`TRTEXEC` overrides its path), reusing `timing.cache` across builds.",
        "2. The same build with trtexec alone (`trtexec.txt`):",
        "", "    " + shlex.join(plan.trtexec_args()), "",
        "3. After a build-engine build, compare the engine with PyTorch (needs torch on the board):",
        "", parity, "",
        "Engines are specific to the GPU and the TensorRT version: build on the board, with the JetPack it runs.",
        "",
    ])
