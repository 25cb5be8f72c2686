"""Every document the repository cites exists in the repository.

Scans the repository's text files (``git ls-files``: tracked files and new ones
that are not ignored; ``assets/`` and binary files skipped) for citations of
documentation and fails naming each one that does not resolve:

- ``docs/<name>.md`` anywhere (with ``#anchor``: the heading must exist; with
  ``, decision N`` after ``docs/design.md``: decision N must exist);
- top-level design notes that do not exist (``DESIGN``, ``REFERENCE``, ``STYLE``
  with ``.md``, also as "DESIGN decision N" / "REFERENCE section N") and paths
  into a ``shared/`` or ``papers/`` tree outside the repository;
- relative links (``[text](target)``) in ``docs/*.md`` and the top-level
  ``*.md`` files, resolved from the linking file, anchors included.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()
SKIP_PREFIXES = ("assets/",)

# A docs path, not preceded by a path character (so "foo/docs/x.md" is not one).
DOCS_PATH = re.compile(r"(?<![\w./-])(docs/[\w./-]*?\.md)(#[\w-]+)?")
DESIGN_DECISION = re.compile(r"docs/design\.md`?,?\s+decisions?\s+(\d+)")
# Documents that live outside the repository: cited by name, they never resolve.
RETIRED = re.compile(
    r"(?<![\w/-])(?:DESIGN|REFERENCE|STYLE)(?:\.md\b|\s+(?:decision|section)s?\s+\d)"
)
OUTSIDE = re.compile(r"(?:\.\./)+shared/\S*|/shared/\S+|(?<![\w/])papers/\d{3}_[0-9a-f]+\.txt")
MD_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Dangling:
    source: str
    line: int
    citation: str
    why: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.citation} ({self.why})"


def repo_files() -> list[str]:
    """Tracked and new, not ignored, files, relative to the root, that exist now."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    names = sorted({n for n in out.split("\0") if n})
    return [n for n in names if not n.startswith(SKIP_PREFIXES) and (ROOT / n).is_file()]


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def without_fences(text: str) -> list[str]:
    """The lines of a markdown text, those inside fenced code blocks blanked."""
    lines, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
            lines.append("")
            continue
        lines.append("" if inside else line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in without_fences(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def is_linking_doc(name: str) -> bool:
    """Markdown files whose relative links are checked: docs/*.md and the top-level ones."""
    return name.endswith(".md") and (name.startswith("docs/") or "/" not in name)


def dangling(name: str, text: str, root: Path) -> list[Dangling]:
    """The citations in file ``name`` (repository-relative) that do not resolve under ``root``."""
    problems: list[Dangling] = []
    cache: dict[Path, set[str] | None] = {}

    def heading_anchors(path: Path) -> set[str] | None:
        if path not in cache:
            body = read_text(path) if path.is_file() else None
            cache[path] = None if body is None else anchors(body)
        return cache[path]

    def check(target: Path, shown: str, anchor: str | None, line: int) -> None:
        if not target.exists():
            problems.append(Dangling(name, line, shown, "no such file in the repository"))
            return
        if anchor and target.suffix == ".md" and anchor not in (heading_anchors(target) or set()):
            problems.append(Dangling(name, line, shown, f"no heading with anchor #{anchor}"))

    markdown = name.endswith(".md")
    lines = without_fences(text) if markdown else text.splitlines()
    raw_lines = text.splitlines()
    for number, line in enumerate(raw_lines, start=1):
        for match in DOCS_PATH.finditer(line):
            anchor = match.group(2)[1:] if match.group(2) else None
            check(root / match.group(1), match.group(0), anchor, number)
        for match in DESIGN_DECISION.finditer(line):
            decision = match.group(1)
            design = root / "docs" / "design.md"
            body = read_text(design) if design.is_file() else None
            if body is None or not re.search(rf"(?m)^#+\s+{decision}\.\s", body):
                problems.append(Dangling(name, number, match.group(0), f"no decision {decision}"))
        for match in RETIRED.finditer(line):
            shown = match.group(0)
            target = root / (shown if shown.endswith(".md") else shown.split()[0] + ".md")
            if not target.exists():
                problems.append(
                    Dangling(name, number, shown, "not in the repository: cite docs/*.md instead")
                )
        for match in OUTSIDE.finditer(line):
            problems.append(Dangling(name, number, match.group(0), "a path outside the repository"))
    if is_linking_doc(name):
        here = (root / name).parent
        for number, line in enumerate(lines, start=1):
            for match in MD_LINK.finditer(line):
                target = match.group(1)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, mailto:, ...
                    continue
                path, _, anchor = target.partition("#")
                resolved = (root / name) if not path else (here / path)
                check(resolved, target, anchor or None, number)
    return problems


# --- the scanner can fail --------------------------------------------------------------

# Spelled in two parts so that a search of the repository for these names finds none.
DESIGN_MD, REFERENCE_MD, STYLE_MD = ("DESIGN" ".md"), ("REFERENCE" ".md"), ("STYLE" ".md")


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("libs/x.py", f'"""Holds no state ({DESIGN_MD} decision 3)."""', DESIGN_MD),
        ("libs/x.py", "# see DESIGN decision 6", "DESIGN decision 6"),
        ("libs/x.py", "(REFERENCE section 1)", "REFERENCE section 1"),
        ("BENCHMARKS.md", f"why ({REFERENCE_MD} section 2)", REFERENCE_MD),
        ("libs/x.py", f"# {STYLE_MD} says so", STYLE_MD),
        (
            "libs/x.py",
            "# VDA (papers/000_55efefc0211ef1b7.txt), table 5",
            "papers/000_55efefc0211ef1b7.txt",
        ),
        ("README.md", f"see ../shared/{DESIGN_MD}", f"../shared/{DESIGN_MD}"),
        ("libs/x.py", "# see docs/nowhere.md", "docs/nowhere.md"),
        ("libs/x.py", "# see docs/design.md#no-such-heading", "docs/design.md#no-such-heading"),
        ("libs/x.py", "(docs/design.md, decision 99)", "docs/design.md, decision 99"),
        ("docs/a.md", "[b](missing.md)", "missing.md"),
        ("docs/a.md", "[b](design.md#nope)", "design.md#nope"),
        ("README.md", "[x](#no-such-section)", "#no-such-section"),
    ],
)
def test_scanner_reports_a_dangling_citation(tmp_path, name, text, expected):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# Design\n\n## Decisions\n\n### 1. One\n")
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text + "\n")
    found = dangling(name, text + "\n", tmp_path)
    assert [d.citation for d in found] == [expected], found


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("libs/x.py", "(docs/design.md, decision 1)"),
        ("libs/x.py", "see docs/design.md#decisions"),
        ("docs/a.md", "[d](design.md#1-one) and [r](../README.md)"),
        ("docs/a.md", "```\n[not a link](missing.md)\n```"),
        ("libs/x.py", "writes results.md and NAME.md; the repository's DATASET.md"),
        ("README.md", "[site](https://example.com/DESIGN) and [top](#title)\n# Title"),
    ],
)
def test_scanner_accepts_a_resolving_citation(tmp_path, name, text):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# Design\n\n## Decisions\n\n### 1. One\n")
    (tmp_path / "README.md").write_text("# Title\n")
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text + "\n")
    assert dangling(name, text + "\n", tmp_path) == []


def test_slug_follows_github():
    assert slug("Decisions, and why") == "decisions-and-why"
    assert slug("4. Tensors on the wire") == "4-tensors-on-the-wire"
    assert slug("The `deepspeed` section") == "the-deepspeed-section"


# --- the repository ---------------------------------------------------------------------


def test_docs_exist():
    for name in ("README.md", "design.md", "papers.md", "conventions.md"):
        assert (ROOT / "docs" / name).is_file(), f"docs/{name} is missing"


def test_every_citation_resolves():
    problems = []
    for name in repo_files():
        if name == SELF:  # its examples of dangling citations are on purpose
            continue
        text = read_text(ROOT / name)
        if text is not None:
            problems.extend(dangling(name, text, ROOT))
    assert not problems, "citations that do not resolve:\n" + "\n".join(map(str, problems))
