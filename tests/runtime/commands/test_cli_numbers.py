"""Every number-typed flag of every command refuses NaN and infinities where argparse parses it,
before any work (a NaN passes every `value <= 0` check and then poisons a timeout or a budget)."""
import importlib
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def number_flags():
    for command, target in SCRIPTS.items():
        parser = importlib.import_module(target.split(":")[0]).build_parser()
        for action in parser._actions:
            if action.type is not None and action.option_strings:
                try:
                    action.type("1.5")
                except Exception:
                    try:
                        action.type("2")
                    except Exception:
                        continue  # not a number
                yield command, action.option_strings[-1], action.type


@pytest.mark.parametrize("command, flag, kind", list(number_flags()),
                         ids=[f"{c} {f}" for c, f, _ in number_flags()])
def test_non_finite_numbers_are_refused_by_the_parser(command, flag, kind):
    for text in ("nan", "inf", "-inf"):
        with pytest.raises(Exception):
            kind(text)
