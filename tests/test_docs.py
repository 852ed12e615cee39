"""The documentation stays true to the code: every relative link of README.md and docs/*.md
resolves (files and heading anchors), every configuration key (config.toml and node/config.py)
is documented in docs/configuration.md, and the conformance statement's query keys are
node/query.py's attribute table."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from node.config import Config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped (hyphens and
    underscores kept), spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page (GitHub numbers repeated ones -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", _FENCE.sub("", page.read_text(encoding="utf-8")),
                         re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    return _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8")))


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


def test_the_link_checker_finds_a_broken_link(tmp_path):
    (tmp_path / "b.md").write_text("# Other page\n\n## Heading `[node]` two\n")
    page = tmp_path / "a.md"
    page.write_text("# A\n\n[ok](b.md#heading-node-two) [ok](#a) [web](https://x.org/y)\n"
                    "[gone](c.md) [no anchor](b.md#nope) [self](#missing)\n"
                    "```\n[in code](ignored.md)\n```\n")
    assert broken_links(page) == ["c.md: no such file", "b.md#nope: no heading #nope in b.md",
                                  "#missing: no heading #missing in a.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page():
    linked = {Path(t.partition("#")[0]).name for t in links(ROOT / "README.md")}
    assert {p.name for p in PAGES[1:]} <= linked


# -- configuration keys --------------------------------------------------------------------------

def code_keys() -> set[tuple[str, str]]:
    """(section, key) of every key node/config.py reads: the fields of each section's class
    (an array of tables inside a section, [[dicomweb.tokens]], is a section of its own)."""
    out: set[tuple[str, str]] = set()

    def walk(section: str, cls: type) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            inner = typing.get_args(hints[f.name])
            if inner and dataclasses.is_dataclass(inner[0]):
                walk(f"{section}.{f.name}", inner[0])  # type: ignore[arg-type]
            else:
                out.add((section, f.name))

    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        cls = hints[f.name]
        cls = (typing.get_args(cls) or (cls,))[0]
        if dataclasses.is_dataclass(cls):
            walk(f.name, cls)  # type: ignore[arg-type]
    return out


def toml_keys() -> set[tuple[str, str]]:
    """(section, key) of every key config.toml shows, the commented-out examples included."""
    out: set[tuple[str, str]] = set()
    section = ""
    for line in (ROOT / "config.toml").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#? ?\[\[?([a-z_.]+)\]\]?\s*(#.*)?$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^#? ?([a-z_0-9]+) = ", line)
        if m and section:
            out.add((section, m.group(1)))
    return out


def documented_keys() -> set[tuple[str, str]]:
    """(section, key) of every row of docs/configuration.md, under its section's heading."""
    out: set[tuple[str, str]] = set()
    section = ""
    for line in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^## `\[\[?([a-z_.]+)\]\]?`", line)
        if m:
            section = m.group(1)
        elif line.startswith("## "):
            section = ""
        m = re.match(r"^\| `([a-z_0-9]+)` \|", line)
        if m and section:
            out.add((section, m.group(1)))
    return out


def test_the_key_lists_are_read_right():
    keys = code_keys()
    assert {("node", "port"), ("dicomweb", "session_minutes"), ("peers", "services"),
            ("dicomweb.tokens", "sha256"), ("destinations", "tls")} <= keys
    assert ("dicomweb", "tokens") not in keys and ("", "path") not in keys
    assert ("tls", "require_client_certificate") in toml_keys()  # commented out there


def test_every_configuration_key_is_documented():
    documented = documented_keys()
    assert toml_keys() - documented == set()
    assert code_keys() - documented == set()
    assert documented - code_keys() == set(), "documented keys the node does not read"
