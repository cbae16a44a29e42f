"""Every relative link and #anchor in README.md and docs/*.md resolves.

Docs move between files (the README was split into docs/, notes get merged into the
reference pages); a link left pointing at a moved section fails silently on GitHub.
Anchors follow GitHub's heading slugs: lower case, everything but letters, digits,
spaces, '-' and '_' dropped, spaces -> '-', repeated headings get -1, -2, ...
Links inside fenced code blocks and inline code are not links.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Pages still being written: a link to one of these may dangle until the file lands
# (then its links and anchors are checked like any other). Empty when none is.
PENDING: set[str] = set()

# docs/ pages that are not reference pages, so the README's table need not list them.
NOT_IN_README: set[str] = set()

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")   # http:, https:, mailto:


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def heading_slugs(text: str) -> set[str]:
    seen: dict[str, int] = {}
    slugs = set()
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))  # link -> its text
        title = title.replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def link_targets(text: str):
    """(line number, target) of every inline link and reference definition."""
    for number, line in prose_lines(text):
        line = INLINE_CODE.sub("", line)
        for match in INLINE_LINK.finditer(line):
            yield number, match.group(1)
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            yield number, definition.group(1)


def broken_links(repo: Path, pages: list[Path], pending: set[str]) -> list[str]:
    problems = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        where = page.relative_to(repo).as_posix()
        for number, target in link_targets(text):
            if EXTERNAL.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            destination = (page.parent / file_part).resolve() if file_part else page
            if not destination.exists():
                try:
                    relative = destination.relative_to(repo).as_posix()
                except ValueError:
                    relative = str(destination)
                if relative not in pending:
                    problems.append(f"{where}:{number}: {target}: no such file")
                continue
            if not anchor:
                continue
            if destination.suffix != ".md":
                problems.append(f"{where}:{number}: {target}: an anchor on a non-Markdown file")
            elif anchor not in heading_slugs(destination.read_text(encoding="utf-8")):
                problems.append(f"{where}:{number}: {target}: no heading with that anchor")
    return problems


def documentation_pages(repo: Path) -> list[Path]:
    return [repo / "README.md"] + sorted((repo / "docs").glob("*.md"))


def test_every_relative_link_and_anchor_resolves():
    pages = documentation_pages(REPO)
    assert len(pages) > 5, "README.md and docs/*.md were not found"
    problems = broken_links(REPO, pages, PENDING)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_readme_links_every_reference_page():
    """A page in docs/ that the README's table does not list is hard to find."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    linked = {target.partition("#")[0] for _, target in link_targets(readme)}
    unlisted = [page.name for page in sorted((REPO / "docs").glob("*.md"))
                if f"docs/{page.name}" not in linked and page.name not in NOT_IN_README]
    assert not unlisted, f"docs/ pages the README does not link: {unlisted}"


# --- the checker itself: it must catch what it is there to catch -----------------------

def test_slugs_follow_github(tmp_path):
    text = ("# Title\n## MariaDB / MySQL through pyodbc\n## Outcome unknown: idempotent "
            "jobs only\n## `cluster`\n## Restarts: 78 and 69 are final\n## Title\n"
            "```\n# not a heading\n```\n")
    assert heading_slugs(text) == {
        "title", "mariadb--mysql-through-pyodbc", "outcome-unknown-idempotent-jobs-only",
        "cluster", "restarts-78-and-69-are-final", "title-1"}


@pytest.mark.parametrize("link, problem", [
    ("[a](missing.md)", "no such file"),
    ("[a](other.md#nowhere)", "no heading with that anchor"),
    ("[a](#nowhere)", "no heading with that anchor"),
    ("[a]: other.md#nowhere", "no heading with that anchor"),
    ("[a](code.py#L3)", "an anchor on a non-Markdown file"),
])
def test_the_checker_reports_a_broken_link(tmp_path, link, problem):
    (tmp_path / "other.md").write_text("# Other\n## Somewhere\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    page = tmp_path / "page.md"
    page.write_text(f"# Page\n\n{link}\n")
    problems = broken_links(tmp_path, [page], pending=set())
    assert len(problems) == 1 and problem in problems[0], problems


def test_the_checker_accepts_good_links_and_ignores_code(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n## Some where\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n[a](other.md) [b](other.md#some-where) [c](#page) "
                    "[d](https://example.com/x#y) `[e](missing.md)` [f](later.md)\n"
                    "```\n[g](missing.md)\n```\n")
    assert broken_links(tmp_path, [page], pending={"later.md"}) == []
