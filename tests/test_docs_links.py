"""Every relative link in README.md and docs/*.md points to a file that exists, and a link to a
heading (`page.md#heading`) to a heading that exists (GitHub's anchors: lower case, punctuation
dropped, spaces as hyphens). Links in code spans and fenced blocks are not links."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose_lines(path: Path):
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def anchors(path: Path) -> set[str]:
    return {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for _, line in prose_lines(path)
        if line.startswith("#")
    }


def test_relative_links_resolve():
    problems = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in prose_lines(doc):
            for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue  # http:, https:, mailto:
                path, _, fragment = target.partition("#")
                file = (doc.parent / path).resolve() if path else doc
                where = f"{doc.relative_to(ROOT)}:{number}: {target}"
                if not file.exists():
                    problems.append(f"{where}: no such file")
                elif fragment and file.suffix == ".md" and fragment not in anchors(file):
                    problems.append(f"{where}: no heading #{fragment} in {file.relative_to(ROOT)}")
    assert not problems, "\n" + "\n".join(problems)
