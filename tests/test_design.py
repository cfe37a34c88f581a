"""docs/design.md is the specification the code cites: every section a citation names exists.

A citation is "design §N" (or "design §N", the spelling before the documents were renamed), a
range "§N-§M" after it, and a list continuing it ("§5, §6"). On a line holding a citation every
other integer "§N" counts too ("logps (design §N), losses (§M)"); a decimal
such as the paper's "§4.1" never does. The sections are the `## N. Title` headings of
docs/design.md, numbered 1..K without a gap.
"""

from __future__ import annotations

import bisect
import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
SCANNED_DIRS = ("optune_jax", "losses", "models", "sampling", "tests", "scripts", "benchmarks",
                "configs", "docs")
SCANNED_FILES = ("README.md",)
SUFFIXES = (".py", ".md", ".yaml", ".sh")

# "design §N" or "design §N", also across a line break; the section sign starts the cited number
_ANCHOR = re.compile(r"\b(?:SPEC|design)\s+(?=§\d)")
# an integer section, never the start of a decimal (§4.1) or of a longer number; then a range
_NUMBER = r"§(\d+)(?!\d)(?!\.\d)"
_SECTION = re.compile(_NUMBER + r"(?:\s*[-–]\s*§?(\d+)(?!\d)(?!\.\d))?")
_HEADING = re.compile(r"^## (\d+)\. \S")


def cited_sections(text: str) -> list[tuple[int, int]]:
    """(line number from 1, section) of every citation in `text`, ranges expanded."""
    lines = text.split("\n")
    starts = list(itertools.accumulate((len(line) + 1 for line in lines), initial=0))
    # the line of each anchor's section sign (m.end(): the anchor stops just before it)
    cited_lines = sorted({bisect.bisect_right(starts, m.end()) - 1 for m in _ANCHOR.finditer(text)})
    out = []
    for i in cited_lines:
        for m in _SECTION.finditer(lines[i]):
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else first
            out += [(i + 1, n) for n in range(first, max(first, last) + 1)]
    return out


def headings(text: str) -> list[str]:
    """The `## ` headings of a markdown text, outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            out.append(line)
    return out


def section_numbers(text: str) -> list[int]:
    return [int(m.group(1)) for h in headings(text) if (m := _HEADING.match(h))]


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES]
    for directory in SCANNED_DIRS:
        files += sorted(p for p in (ROOT / directory).rglob("*")
                        if p.suffix in SUFFIXES and p.is_file() and "__pycache__" not in p.parts)
    return [p for p in files if p.exists()]


def test_headings_are_numbered_consecutively():
    found = headings(DESIGN.read_text(encoding="utf-8"))
    unnumbered = [h for h in found if not _HEADING.match(h)]
    assert not unnumbered, f"{DESIGN.relative_to(ROOT)}: headings without 'N. ': {unnumbered}"
    numbers = section_numbers(DESIGN.read_text(encoding="utf-8"))
    assert numbers, f"{DESIGN.relative_to(ROOT)} has no '## N. Title' heading"
    assert numbers == list(range(1, len(numbers) + 1)), (
        f"{DESIGN.relative_to(ROOT)}: sections numbered {numbers}, expected 1..{len(numbers)}"
    )


def test_every_cited_section_exists():
    sections = set(section_numbers(DESIGN.read_text(encoding="utf-8")))
    missing, count = [], 0
    for path in scanned_files():
        for line, n in cited_sections(path.read_text(encoding="utf-8")):
            count += 1
            if n not in sections:
                missing.append(f"{path.relative_to(ROOT)}:{line}: §{n}")
    assert count, "no citation found: the scanner is broken"
    assert not missing, (
        f"cited sections missing from {DESIGN.relative_to(ROOT)} (it has §1-§{max(sections)}):\n"
        + "\n".join(missing)
    )


def test_citation_forms():
    # built from parts, so this file holds no citation of its own
    old, new = "SPEC", "design"
    text = "\n".join([
        f"a ({old} §42).",                                  # 1: a section that does not exist
        f"b ({new} §3-§4, §6): the wiring",                 # 2: a range and a list
        f"c ({new} §5, §6) and (§2)",                        # 3: a list, a bare § on the line
        f"d {old} §4 step 1; the paper's §4.1 and §12.3",    # 4: step numbers, decimals
        "e the paper's §3 alone",                            # 5: no citation on the line
        f"f ({new}",                                         # 6: broken across lines
        "§9)",                                               # 7
        f"g {new} §2–§3",                                    # 8: an en dash
    ])
    assert cited_sections(text) == [
        (1, 42), (2, 3), (2, 4), (2, 6), (3, 5), (3, 6), (3, 2), (4, 4), (7, 9), (8, 2), (8, 3),
    ]
    assert 42 not in set(section_numbers(DESIGN.read_text(encoding="utf-8")))


def test_heading_forms():
    text = "# t\n## 1. A\n```\n## 9. in a fence\n```\n## 2. B\n### 2.1 sub\n## 4. D\n"
    assert section_numbers(text) == [1, 2, 4]
    assert headings("## Notes\n") == ["## Notes"] and section_numbers("## Notes\n") == []
