"""Every measured figure in the docs cites its raw file, and matches it.

A measured figure is a Markdown link whose target is a raw JSON file (path relative to
the ``.md`` file) and whose title is a path into that JSON, optionally followed by
scale operations::

    [0.659 ms](benchmarks/h100-small-fp16-static-decoders.json "results.0.decode_p50_ms")
    [99.51 %](benchmarks/x.json "lease_2.parity.parity-int4-past-float.generation.teacher_forced_top1 x100")
    [1.249 ms](benchmarks/x.json "results[backend=onnxruntime-cuda-static-cache,batch=32].decode_p50_ms")

Path grammar (the title, before any scale operations)::

    path    := segment ("." segment)*
    segment := key | index | key "[" filter ("," filter)* "]" | "[" filter ("," filter)* "]"
    index   := an integer: a position in a list (negative counts from the end)
    key     := a dict key, written as is (spaces allowed; no ".", "[" or "]");
               with "*" or "?" it is a glob (fnmatch) that must match exactly one key
    filter  := field "=" value: of the list's records, the one whose ``field``, written as
               JSON text or as Python's str(), equals ``value``; exactly one must match

Scale operations are the title's trailing whitespace-separated words, applied in order to
the raw value: ``xN`` multiplies by N (``x100``: a fraction shown as a percent, ``x1000``:
seconds shown as ms, ``x1e-6``: bytes shown as MB), ``/N`` divides by N (``/1048576``: bytes
shown as MiB), ``inv`` takes the reciprocal (``inv x1000``: tokens/s shown as ms per token).

The figure is the first number in the link text (thousands separators and exponents
allowed: ``6,529``, ``1.25e-4``). It must equal the scaled raw value within half a unit of
its last digit shown (``0.659`` within 0.0005; an integer with trailing zeros counts to its
last non-zero digit, so ``32,000`` is within 500). A leading ``~`` or ``≈`` means
approximately: within 5 %.

Checked: README.md and every docs/*.md. All problems are reported at once, each with file,
line, the text shown, the JSON path and the raw value.

A second check finds measured figures in docs/benchmarks.md that cite nothing: a number
followed by a unit (ms, µs, s, tokens/s, requests/s, MB, MiB, GB, GiB, TB/s, GB/s, %,
bits/byte) in prose or tables, and in table rows a cell that is only a number. Settings are
not measurements: write them inside backticks (`` `97 %` ``, `` `--iters 3` ``); table
columns named in SETTING_COLUMNS (batch, clients, bar, ...) hold settings too, and the few
phrases in ALLOWED_PHRASES are names whose digits are no figure ("H100 80GB HBM3"). Fenced
code blocks, inline code and link targets are skipped. Ratios such as ``0.83×`` carry no unit
and are not checked: write them next to the two cited figures they come from.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A link whose target is a .json file; the title (a JSON path) makes it a citation.
LINK = re.compile(r'\[(?P<text>[^\]]*)\]\((?P<target>[^)\s"]+\.json)(?:\s+"(?P<title>[^"]*)")?\)')
NUMBER = re.compile(
    r"(?P<approx>[~≈]\s?)?(?<![\w.])(?P<num>[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?)"
)
SCALE_OP = re.compile(r"^(?:x[0-9.eE+-]+|/[0-9.eE+-]+|inv)$")
APPROX_RELATIVE = 0.05

UNITS = r"(?:ms|µs|us|s|tokens/s|requests/s|MB|MiB|GB|GiB|TB/s|GB/s|%|bits/byte)"
UNIT_FIGURE = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?\s?" + UNITS + r"(?![\w/])")
BARE_NUMBER_CELL = re.compile(r"^[~≈]?\s?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?\s?(?:" + UNITS + r")?$")
# Columns whose cells are settings, not measurements (lower-case header text).
SETTING_COLUMNS = {"batch", "clients", "bar", "context", "rows"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ---------------------------------------------------------------- the grammar


class PathError(ValueError):
    """A JSON path that does not resolve."""


def split_title(title: str) -> tuple[str, list[str]]:
    """The JSON path and the scale operations of a citation's title."""
    words = title.split(" ")
    ops: list[str] = []
    while len(words) > 1 and SCALE_OP.match(words[-1]):
        ops.insert(0, words.pop())
    return " ".join(words).strip(), ops


def split_path(path: str) -> list[str]:
    """Split at dots outside brackets."""
    parts, depth, current = [], 0, ""
    for char in path:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "." and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    if any(part == "" for part in parts) or depth != 0:
        raise PathError(f"malformed path {path!r}")
    return parts


def _as_texts(value) -> set[str]:
    return {json.dumps(value), str(value)}


def _select(records, filters: str, where: str):
    if not isinstance(records, list):
        raise PathError(f"{where}: a filter needs a list, found {type(records).__name__}")
    wanted = []
    for item in filters.split(","):
        field, sep, value = item.partition("=")
        if not sep:
            raise PathError(f"{where}: filter {item!r} is not field=value")
        wanted.append((field.strip(), value.strip()))
    matches = [
        record
        for record in records
        if isinstance(record, dict)
        and all(field in record and value in _as_texts(record[field]) for field, value in wanted)
    ]
    if len(matches) != 1:
        raise PathError(f"{where}: [{filters}] matches {len(matches)} records, not one")
    return matches[0]


def _step(node, key: str, where: str):
    if isinstance(node, list):
        try:
            return node[int(key)]
        except (ValueError, IndexError):
            raise PathError(f"{where}: no list index {key!r} (length {len(node)})") from None
    if not isinstance(node, dict):
        raise PathError(f"{where}: {key!r} asked of a {type(node).__name__}")
    if key in node:
        return node[key]
    if any(char in key for char in "*?"):
        found = [name for name in node if fnmatch.fnmatchcase(name, key)]
        if len(found) == 1:
            return node[found[0]]
        raise PathError(f"{where}: glob {key!r} matches {len(found)} keys, not one")
    raise PathError(f"{where}: no key {key!r}")


def resolve(document, path: str):
    """The value at ``path`` (the grammar above) in a parsed JSON document."""
    node = document
    walked = ""
    for segment in split_path(path):
        where = walked or "(root)"
        match = re.fullmatch(r"(?P<key>[^\[\]]*)(?:\[(?P<filters>[^\[\]]*)\])?", segment)
        if match is None:
            raise PathError(f"{where}: malformed segment {segment!r}")
        if match["key"]:
            node = _step(node, match["key"], where)
        if match["filters"] is not None:
            node = _select(node, match["filters"], where)
        walked = f"{walked}.{segment}" if walked else segment
    return node


def apply_ops(value: float, ops: list[str]) -> float:
    for op in ops:
        if op == "inv":
            value = 1.0 / value
        elif op.startswith("x"):
            value *= float(op[1:])
        else:
            value /= float(op[1:])
    return value


@dataclass(frozen=True)
class Shown:
    value: float
    half_unit: float
    approximate: bool


def parse_shown(text: str) -> Shown | None:
    """The first number of a link text, its rounding and whether it is approximate."""
    match = NUMBER.search(text)
    if match is None:
        return None
    raw = match["num"].replace(",", "").replace("−", "-")
    mantissa, _, exponent = raw.lower().partition("e")
    exp = int(exponent) if exponent else 0
    if "." in mantissa:
        unit = 10.0 ** (-len(mantissa.split(".")[1]))
    else:
        digits = mantissa.lstrip("+-")
        trailing = len(digits) - len(digits.rstrip("0")) if digits.strip("0") else 0
        unit = 10.0**trailing
    return Shown(float(raw), 0.5 * unit * 10.0**exp, match["approx"] is not None)


def matches(shown: Shown, value: float) -> bool:
    if shown.approximate:
        return abs(shown.value - value) <= APPROX_RELATIVE * abs(value)
    return abs(shown.value - value) <= shown.half_unit * (1 + 1e-9) + 1e-12 * abs(value)


# ---------------------------------------------------------------- reading docs


@dataclass(frozen=True)
class Citation:
    doc: Path
    line: int
    text: str
    target: str
    title: str

    def where(self) -> str:
        return f"{rel(self.doc)}:{self.line}: [{self.text}]"


def rel(path: Path) -> Path:
    try:
        return path.relative_to(ROOT)
    except ValueError:
        return path


def strip_fences(lines: list[str]) -> list[str]:
    """Lines with fenced code blocks blanked (line numbers kept)."""
    out, fenced = [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return out


def citations(doc: Path) -> list[Citation]:
    found = []
    for number, line in enumerate(strip_fences(doc.read_text().splitlines()), 1):
        for link in LINK.finditer(line):
            if link["title"] is not None:
                found.append(Citation(doc, number, link["text"], link["target"], link["title"]))
    return found


def json_links(doc: Path) -> list[tuple[int, str]]:
    return [
        (number, link["target"])
        for number, line in enumerate(strip_fences(doc.read_text().splitlines()), 1)
        for link in LINK.finditer(line)
    ]


@lru_cache(maxsize=None)
def load(path: Path):
    return json.loads(path.read_text())


def check_citation(cite: Citation) -> tuple[str, str] | None:
    """None when the citation holds, else (kind, one line saying why not); kind is
    "resolve" (missing file, path that does not resolve, no number) or "mismatch"."""
    raw_file = (cite.doc.parent / cite.target).resolve()
    if not raw_file.is_file():
        return "resolve", f"{cite.where()}: raw file {cite.target} does not exist"
    path, ops = split_title(cite.title)
    try:
        value = resolve(load(raw_file), path)
    except PathError as error:
        return "resolve", f"{cite.where()}: {cite.target} \"{path}\" does not resolve: {error}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "resolve", f"{cite.where()}: {cite.target} \"{path}\" is {repr(value)[:120]}, not a number"
    shown = parse_shown(cite.text)
    if shown is None:
        return "resolve", f"{cite.where()}: the link text holds no number"
    scaled = apply_ops(float(value), ops)
    if not matches(shown, scaled):
        scale = f" ({' '.join(ops)}: {scaled:.6g})" if ops else ""
        return "mismatch", f"{cite.where()}: shows {shown.value:g}, {cite.target} \"{path}\" is {value!r}{scale}"
    return None


def all_citations() -> list[Citation]:
    return [cite for doc in doc_files() for cite in citations(doc)]


# ---------------------------------------------------------------- uncited figures


# Phrases whose numbers are names, not measurements.
ALLOWED_PHRASES = ("H100 80GB HBM3",)


def _mask(line: str) -> str:
    for phrase in ALLOWED_PHRASES:
        line = line.replace(phrase, " ")
    line = re.sub(r"`[^`]*`", " ", line)  # settings and code
    line = LINK.sub(" ", line)  # citations (and plain links to raw files)
    line = re.sub(r"\]\([^)]*\)", "]", line)  # other link targets
    return re.sub(r"<!--.*?-->", " ", line)


def table_cells(line: str) -> list[str]:
    """The cells of a Markdown table row (escaped pipes stay inside their cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def uncited_figures(doc: Path) -> list[str]:
    problems = []
    header: list[str] | None = None
    for number, line in enumerate(strip_fences(doc.read_text().splitlines()), 1):
        where = f"{rel(doc)}:{number}"
        if not line.lstrip().startswith("|"):
            header = None
            problems += [f"{where}: {m.group(0)!r} cites no raw file" for m in UNIT_FIGURE.finditer(_mask(line))]
            continue
        cells = table_cells(line)
        if header is None:
            header = [cell.strip("* ").lower() for cell in cells]
            continue
        if all(set(cell) <= set("-: ") for cell in cells):
            continue
        for column, cell in enumerate(cells):
            name = header[column] if column < len(header) else ""
            if name in SETTING_COLUMNS:
                continue
            bare = _mask(cell).replace("**", "").strip()
            problems += [f"{where}: {m.group(0)!r} cites no raw file" for m in UNIT_FIGURE.finditer(bare)]
            if BARE_NUMBER_CELL.match(bare) and not UNIT_FIGURE.search(bare):
                problems.append(f"{where}: cell {bare!r} ({name}) cites no raw file")
    return problems


# ---------------------------------------------------------------- tests


def test_docs_cite_figures():
    assert len(all_citations()) > 100, "docs/benchmarks.md should cite its figures"


def test_cited_files_and_paths_resolve():
    problems = []
    for doc in doc_files():
        for number, target in json_links(doc):
            if not (doc.parent / target).resolve().is_file():
                problems.append(f"{rel(doc)}:{number}: {target} does not exist")
    for cite in all_citations():
        problem = check_citation(cite)
        if problem and problem[0] == "resolve":
            problems.append(problem[1])
    assert not problems, f"\n{len(problems)} broken citation(s):\n" + "\n".join(problems)


def test_cited_figures_match_raw_files():
    problems = [problem[1] for cite in all_citations() if (problem := check_citation(cite))]
    assert not problems, f"\n{len(problems)} cited figure(s) wrong:\n" + "\n".join(problems)


def test_benchmarks_md_has_no_uncited_figures():
    problems = uncited_figures(ROOT / "docs" / "benchmarks.md")
    assert not problems, f"\n{len(problems)} uncited figure(s):\n" + "\n".join(problems)


# ---------------------------------------------------------------- the checker itself

SAMPLE = {
    "results": [
        {"backend": "a", "batch": 1, "decode_p50_ms": 0.6594},
        {"backend": "a", "batch": 32, "decode_p50_ms": 1.2494},
        {"backend": "b", "batch": 32, "decode_p50_ms": 1.5708},
    ],
    "top_kernels": {"void onnxruntime::cuda::_ScatterNDKernel<short>(short*, long": 120.2},
    "1x513 random bytes": {"top1": 0.99512, "bytes": 268342544, "tokens_per_second": 1534.23},
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("results.0.decode_p50_ms", 0.6594),
        ("results.-1.batch", 32),
        ("results[backend=a,batch=32].decode_p50_ms", 1.2494),
        ("results[backend=\"b\"].decode_p50_ms", 1.5708),
        ("top_kernels.*ScatterND*", 120.2),
        ("1x513 random bytes.top1", 0.99512),
    ],
)
def test_resolve(path, expected):
    assert resolve(SAMPLE, path) == expected


@pytest.mark.parametrize(
    "path", ["results.3.batch", "results[backend=a].batch", "results[batch=8]", "nothing", "results..batch", "top_kernels.*Gemm*"]
)
def test_resolve_refuses(path):
    with pytest.raises(PathError):
        resolve(SAMPLE, path)


@pytest.mark.parametrize(
    ("text", "title", "ok"),
    [
        ("0.659 ms", "results.0.decode_p50_ms", True),
        ("0.660 ms", "results.0.decode_p50_ms", False),
        ("0.66", "results.0.decode_p50_ms", True),
        ("99.51 %", "1x513 random bytes.top1 x100", True),
        ("99.52 %", "1x513 random bytes.top1 x100", False),
        ("268.3 MB", "1x513 random bytes.bytes x1e-6", True),
        ("255.9 MiB", "1x513 random bytes.bytes /1048576", True),
        ("0.652 ms per token", "1x513 random bytes.tokens_per_second inv x1000", True),
        ("270,000,000 bytes", "1x513 random bytes.bytes", True),
        ("~280 MB", "1x513 random bytes.bytes x1e-6", True),
        ("~300 MB", "1x513 random bytes.bytes x1e-6", False),
        ("1.3e-4", "results.0.decode_p50_ms x0.0002", True),
        ("1.2e-4", "results.0.decode_p50_ms x0.0002", False),
        ("no figure", "results.0.decode_p50_ms", False),
        ("1", "results.0.backend", False),
    ],
)
def test_check_citation(tmp_path, text, title, ok):
    (tmp_path / "raw.json").write_text(json.dumps(SAMPLE))
    doc = tmp_path / "doc.md"
    doc.write_text(f'A figure: [{text}](raw.json "{title}").\n')
    (cite,) = citations(doc)
    problem = check_citation(cite)
    assert (problem is None) == ok, problem


def test_uncited_figures_are_found(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        "Cited [0.66 ms](raw.json \"results.0.decode_p50_ms\"), a setting `0.5 ms`, uncited 1.25 ms and 98 %.\n"
        "\n"
        "| backend | batch | decode ms | bar |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| a | 1 | [0.659](raw.json \"results.0.decode_p50_ms\") | 99 |\n"
        "| b | 32 | 1.571 | 99 |\n"
        "\n```\nbenchmark --iters 10 # 3.5 ms in a code block\n```\n"
    )
    problems = uncited_figures(doc)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "'1.25 ms' cites no raw file",
        "'98 %' cites no raw file",
        "cell '1.571' (decode ms) cites no raw file",
    ]
