"""The codebase's shape: no import cycles (function-level imports and the registry's lazy loaders
count), no function over 60 lines, facts spelled in one place, and clients that stay light."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "export", "runtime")
LAZY_LOADER = re.compile(r"^((?:models|export|runtime)(?:\.\w+)+):\w+$")  # "runtime.x.y:function"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module `name` imports, at module or function level, or names in a lazy loader."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            targets += [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and LAZY_LOADER.match(node.value):
            targets.append(LAZY_LOADER.match(node.value).group(1))
    found = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_no_import_cycles_anywhere():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


def test_layers_point_one_way_models_export_runtime():
    known = modules()
    for name, path in known.items():
        layer = PACKAGES.index(name.split(".")[0])
        for target in imports_of(name, path, known):
            assert PACKAGES.index(target.split(".")[0]) <= layer, f"{name} imports {target}"


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []


def test_cache_tensor_names_are_spelled_only_in_the_signature_module():
    pattern = re.compile(r"""["'](past_key_values\.|present\.)""")
    spelled = [f"{path.relative_to(ROOT)}:{number}" for path in modules().values()
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if pattern.search(line) and path.name != "signature.py"]
    assert spelled == []


def test_backend_lists_and_device_guesses_live_only_in_the_registry():
    """No second list of backend names, and no guessing a device from a backend's name."""
    from runtime.registry import BACKENDS

    found = []
    for name, path in modules().items():
        if name == "runtime.registry":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                names = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in BACKENDS]
                if len(names) >= 2:
                    found.append(f"{name}:{node.lineno} lists {names}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "startswith"
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in BACKENDS):
                found.append(f"{name}:{node.lineno} guesses from a name starting {node.args[0].value!r}")
    assert found == []


def test_result_files_are_written_only_through_the_provenance_helper():
    """Every command's and script's result carries its provenance (runtime/provenance.py): no
    `json.dump` of a result beside it. (The held-out prompts, the edge bundle's manifest, a sharded
    checkpoint's index and the byte tokenizer's files are inputs and artifacts in formats other
    tools read, not results.)"""
    allowed = {"runtime/provenance.py", "runtime/edge/bundle.py", "scripts/train_reference.py:prompts",
               "models/shards.py", "scripts/make_byte_tokenizer.py"}
    writers = re.compile(r"json\.dump\(|write_text\(json\.dumps\(")
    found = []
    for path in [*modules().values(), *(ROOT / "scripts").glob("*.py")]:
        relative = str(path.relative_to(ROOT))
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if writers.search(line) and relative not in allowed and not (
                    f"{relative}:prompts" in allowed and "held_out_prompts" in line):
                found.append(f"{relative}:{number}")
    assert found == []


def test_the_client_side_of_serving_never_imports_torch():
    """loadtest's worker processes and the OpenAI API workers load these modules each: torch would
    cost seconds per process (on a GPU machine with CUDA, long enough to miss a timed cut)."""
    modules = ["runtime.serving.loadtest", "runtime.serving.clients", "runtime.serving.openai_api",
               "runtime.serving.requests", "runtime.commands.loadtest"]
    calls = ("from runtime.serving.clients import grpc_inputs, openai_body\n"  # what a worker runs per request
             "from runtime.serving.openai_api import create_app\n"
             "request = {'prompt_ids': [1, 2], 'max_new_tokens': 4, 'temperature': 0.8, 'filter_thres': 0.9}\n"
             "openai_body(request, 256); grpc_inputs(request); create_app('127.0.0.1:1', 'm', 256, 64)\n")
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n{calls}"
            "print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"
