"""The README stays short and starts with the set-up commands, and the docs' links resolve.

Pure file checks, no Redis. Links are checked the way GitHub renders them:
relative to the page, inside the repository, and an ``#anchor`` must name a
heading of its page (GitHub's slugs: lowercase, punctuation other than ``-``
and ``_`` dropped, spaces to ``-``, ``-1``, ``-2`` ... for repeated headings).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 8192  # bytes, as `wc -c` counts them

# Built from parts, so that this file does not itself mention what it looks for.
OUTSIDE_REFERENCES = ("DESIGN" + ".md", "../" + "shared")
CHECKED_FOR_OUTSIDE_REFERENCES = ("README.md", "docs", "tokencache", "workers", "tests", "bench", "examples")

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def prose_lines(text: str) -> Iterator[str]:
    """The lines outside fenced code blocks, with inline code removed."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield INLINE_CODE.sub("", line)


def code_blocks(text: str) -> list[str]:
    blocks: list[str] = []
    current: list[str] | None = None
    for line in text.splitlines():
        if FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def slug(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The ``#anchors`` GitHub gives the headings of ``page``."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = None if fenced else HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return [target for line in prose_lines(page.read_text()) for target in LINK.findall(line)]


def broken_link(page: Path, target: str) -> str | None:
    """Why ``target``, linked from ``page``, does not resolve (None when it does)."""
    if SCHEME.match(target):
        return None  # a web address: not a file of this repository
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    if not linked.is_relative_to(ROOT):
        return "points outside the repository"
    if not linked.exists():
        return "names no file"
    if anchor and linked.suffix == ".md" and anchor not in anchors(linked):
        return f"names no heading of {linked.relative_to(ROOT)}"
    return None


def files_checked_for_outside_references() -> list[Path]:
    found: list[Path] = []
    for name in CHECKED_FOR_OUTSIDE_REFERENCES:
        top = ROOT / name
        candidates = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in candidates:
            parts = path.relative_to(ROOT).parts
            if path.is_file() and not any(p == "__pycache__" or p.startswith(".") for p in parts):
                found.append(path)
    return found


def test_readme_is_at_most_8_kb() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/ (limit {README_LIMIT})"


def test_readme_starts_with_the_two_setup_commands() -> None:
    text = README.read_text()
    first = code_blocks(text)[0]
    assert "./run demo" in first and "./run test" in first, "README's first code block lost a set-up command"
    before = text[: text.index("```")].split()
    assert before[0] == "#" and len(before) == 2, "only the title may come before the set-up commands"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README)}
    missing = [str(page.relative_to(ROOT)) for page in pages()[1:] if page not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_every_relative_link_and_image_resolves() -> None:
    assert len(pages()) > 1, "docs/ has no pages"
    broken = [
        f"{page.relative_to(ROOT)}: ({target}) {why}"
        for page in pages()
        for target in links(page)
        if (why := broken_link(page, target)) is not None
    ]
    assert not broken, "\n".join(broken)


def test_the_link_checker_sees_links_headings_and_anchors() -> None:
    assert slug("The google-auth and `requests` adapters") == "the-google-auth-and-requests-adapters"
    assert slug("Testing with tokencache.testing") == "testing-with-tokencachetesting"
    assert slug("for_scope") == "for_scope"
    assert LINK.findall("see ![chart](performance/results.png) and [x](design.md#flows)") == [
        "performance/results.png",
        "design.md#flows",
    ]
    assert list(prose_lines("a\n```sh\n# not a heading [x](nowhere.md)\n```\n`[y](nowhere.md)` b")) == [
        "a",
        " b",
    ]
    assert broken_link(README, "docs/nowhere.md") == "names no file"
    assert broken_link(README, "#no-such-heading") == "names no heading of README.md"
    assert broken_link(README, "../outside.md") == "points outside the repository"


def test_nothing_mentions_a_file_outside_the_repository() -> None:
    checked = files_checked_for_outside_references()
    assert README in checked and len(checked) > 20
    offending = [
        f"{path.relative_to(ROOT)} mentions {needle}"
        for path in checked
        for needle in OUTSIDE_REFERENCES
        if needle.encode() in path.read_bytes()
    ]
    assert not offending, "\n".join(offending)


PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_examples() -> Iterator[tuple[str, str]]:
    for page in pages():
        for n, block in enumerate(PYTHON_BLOCK.findall(page.read_text()), 1):
            yield f"{page.relative_to(ROOT)} python block {n}", block


def test_python_examples_compile() -> None:
    """Every ``python`` block in the README and docs is valid Python (top-level ``await`` allowed)."""
    examples = list(python_examples())
    assert len(examples) >= 5, "the docs lost their python examples"
    for where, code in examples:
        try:
            compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        except SyntaxError as e:
            raise AssertionError(f"{where} does not compile: {e}") from None


def test_python_examples_import_what_exists() -> None:
    """Every ``from tokencache... import name`` in an example names something that exists."""
    for where, code in python_examples():
        tree = ast.parse(code, where, feature_version=(3, 11))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokencache"):
                module = importlib.import_module(node.module or "")
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(
                        f"{node.module}.{alias.name}"
                    ), f"{where}: {node.module} has no {alias.name}"
