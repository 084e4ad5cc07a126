"""The documentation a newcomer reads: the README stays short, and every relative link in it and in the pages it
leads to points at a file or folder of this repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "charts" / "mysproj" / "README.md",
         REPO / "k8s" / "README.md", *sorted((REPO / "benchmarks").glob("*.md"))]

INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def relative_links(text: str) -> list[str]:
    """Link targets outside code blocks and inline code that name a path (not a URL, not an anchor on this page),
    without their `#anchor`."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t.split("#", 1)[0] for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.I)]


def test_the_link_reader_sees_what_a_renderer_links():
    text = ("[a](docs/x.md) [b](../y/#part) ![c](img.png) [d](https://e.org) [f](#here) `[g](code.md)`\n"
            "```\n[h](block.md)\n```\n[i]: ref.md\n")
    assert relative_links(text) == ["docs/x.md", "../y/", "img.png", "ref.md"]


def test_every_relative_link_resolves():
    assert all(p.is_file() for p in PAGES), [str(p) for p in PAGES if not p.is_file()]
    broken = [f"{page.relative_to(REPO)}: {target}" for page in PAGES for target in relative_links(page.read_text())
              if not (page.parent / target).resolve().exists()
              or REPO not in (page.parent / target).resolve().parents and (page.parent / target).resolve() != REPO]
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail to docs/"
