"""The documentation holds together: every relative link in the README, the docs/ pages (reports
included) and benchmarks/README.md names a file that exists, and the README stays a short entry page
(the manual lives in docs/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 200

_FENCED_CODE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//|#)")


def relative_links(text: str) -> list[str]:
    """The relative link targets of a markdown text without their anchors; code and external links left out.

    Code spans and fenced blocks are removed first, since what looks like a link there is code.
    A target starting with a scheme (``https:``, ``mailto:``), ``//`` or ``#`` is not a file path.
    """
    prose = _INLINE_CODE.sub("", _FENCED_CODE.sub("", text))
    targets = _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)
    return [target.split("#", 1)[0].split("?", 1)[0] for target in targets if not _EXTERNAL.match(target)]


def test_the_link_reader_finds_relative_links_and_skips_code_and_urls():
    text = (
        'See [usage](docs/usage.md#generate) and ![plot](results/a.png "title").\n'
        "[ref]: ../benchmarks/README.md\n"
        "Not [a link](https://example.org), not [this](#anchor), not `[code](x.md)`.\n"
        "```python\nx = [1](2)\n```\n"
    )
    assert relative_links(text) == ["docs/usage.md", "results/a.png", "../benchmarks/README.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_names_an_existing_file(page):
    broken = [
        target for target in relative_links(page.read_text(encoding="utf-8")) if not (page.parent / target).exists()
    ]
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"


def test_the_documentation_pages_are_there():
    pages = {str(page.relative_to(ROOT)) for page in PAGES}
    expected = {f"docs/{name}.md" for name in ("usage", "methods", "evaluation", "cache", "results", "ARCHITECTURE")}
    assert {"README.md", "benchmarks/README.md"} | expected <= pages


def test_the_readme_stays_under_200_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (limit {README_MAX_LINES})"


def test_the_readme_opens_with_the_two_fresh_machine_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    demo = readme.index("bash scripts/setup.sh && .venv/bin/lavakv demo")
    tests = readme.index("bash scripts/setup.sh && .venv/bin/python -m pytest -q")
    assert demo < tests < readme.index("## Quick start")
