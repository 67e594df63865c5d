"""docs/cli.md documents every flag of every command, and no flag that does not exist.

The commands are pyproject.toml's [project.scripts]; each one's module has `build_parser()`.
docs/cli.md has one `## <command>` section per command, holding a synopsis (its first fenced
code block) and a flag table (rows starting with `|`; the flags are the ones written in
backticks in the first cell, e.g. `` `--output PATH`, `-o` ``). For every command:

- every option string of its parser (`--help` aside) is in the first cell of a row of its table,
  and every positional argument is named there (its metavar, or its name in capitals);
- every flag in the first cells of its table and in its synopsis is one its parser has.

Flags named elsewhere on the page (prose, the meaning column) may belong to other commands and
are not checked; the shared model-flags table's flags must exist in at least one parser.
"""

from __future__ import annotations

import argparse
import importlib
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"

FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
CODE = re.compile(r"`([^`]*)`")


def commands() -> dict[str, str]:
    """Command name -> module, from [project.scripts]."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


def parser_of(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(module).build_parser()


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {
        option
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
    }


def parser_positionals(parser: argparse.ArgumentParser) -> set[str]:
    """Each positional's accepted names in the docs: its metavar and its name in capitals."""
    names = set()
    for action in parser._actions:
        if not action.option_strings:
            names.add(frozenset(filter(None, [action.metavar if isinstance(action.metavar, str) else None,
                                              action.dest.upper()])))
    return names


def sections(text: str) -> dict[str, list[str]]:
    """`## heading` -> the lines under it, up to the next `## ` heading."""
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return found


def table_flags(lines: list[str]) -> tuple[set[str], str]:
    """The flags in backticks in the first cells of table rows, and those cells' text."""
    flags, cells, fenced = set(), [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or not line.lstrip().startswith("|"):
            continue
        first = re.split(r"(?<!\\)\|", line.strip().strip("|"))[0]
        cells.append(first)
        for code in CODE.findall(first):
            flags.update(FLAG.findall(code))
    return flags, "\n".join(cells)


def synopsis_flags(lines: list[str]) -> set[str]:
    """The flags of the section's first fenced code block."""
    block, inside = [], False
    for line in lines:
        if line.lstrip().startswith("```"):
            if inside:
                break
            inside = True
            continue
        if inside:
            block.append(line)
    return set(FLAG.findall("\n".join(block)))


def problems_for(command: str, parser: argparse.ArgumentParser, lines: list[str] | None) -> list[str]:
    if lines is None:
        return [f"docs/cli.md has no '## {command}' section"]
    problems = []
    documented, first_cells = table_flags(lines)
    real = parser_flags(parser)
    problems += [f"{command}: {flag} is in the parser but not in its flag table" for flag in sorted(real - documented)]
    problems += [f"{command}: the flag table lists {flag}, which the parser does not have"
                 for flag in sorted(documented - real)]
    problems += [f"{command}: the synopsis shows {flag}, which the parser does not have"
                 for flag in sorted(synopsis_flags(lines) - real)]
    for names in parser_positionals(parser):
        if not any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", first_cells) for name in names):
            problems.append(f"{command}: the positional argument {'/'.join(sorted(names))} is not in its flag table")
    return problems


@pytest.mark.parametrize("command", sorted(commands()))
def test_cli_md_matches_parser(command):
    parser = parser_of(commands()[command])
    problems = problems_for(command, parser, sections(CLI_MD.read_text()).get(command))
    assert not problems, "\n" + "\n".join(problems)


def test_model_flags_exist():
    lines = sections(CLI_MD.read_text())["The model flags"]
    documented, _ = table_flags(lines)
    every = set().union(*(parser_flags(parser_of(module)) for module in commands().values()))
    assert documented and documented <= every, sorted(documented - every)


def test_the_check_catches_both_directions():
    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--kept")
    parser.add_argument("--undocumented")
    doc = [
        "```", "demo MODEL [--kept X] [--stale]", "```", "",
        "| flag | meaning |", "| --- | --- |",
        "| `--kept X` | mentions `--elsewhere` in the meaning column, which is not checked |",
        "| `--gone` | no longer exists |",
    ]
    assert problems_for("demo", parser, doc) == [
        "demo: --undocumented is in the parser but not in its flag table",
        "demo: the flag table lists --gone, which the parser does not have",
        "demo: the synopsis shows --gone, which the parser does not have".replace("--gone", "--stale"),
        "demo: the positional argument MODEL is not in its flag table",
    ]
