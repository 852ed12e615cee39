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

ROOT = Path(__file__).resolve().parents[2]
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
    for m in re.finditer(r"^#{1,6} (.+)$", _FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
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
    page.write_text(
        "# A\n\n[ok](b.md#heading-node-two) [ok](#a) [web](https://x.org/y)\n"
        "[gone](c.md) [no anchor](b.md#nope) [self](#missing)\n"
        "```\n[in code](ignored.md)\n```\n"
    )
    assert broken_links(page) == [
        "c.md: no such file",
        "b.md#nope: no heading #nope in b.md",
        "#missing: no heading #missing in a.md",
    ]


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
    assert {
        ("node", "port"),
        ("dicomweb", "session_minutes"),
        ("peers", "services"),
        ("dicomweb.tokens", "sha256"),
        ("destinations", "tls"),
    } <= keys
    assert ("dicomweb", "tokens") not in keys and ("", "path") not in keys
    assert ("tls", "require_client_certificate") in toml_keys()  # commented out there


def test_every_configuration_key_is_documented():
    documented = documented_keys()
    assert toml_keys() - documented == set()
    assert code_keys() - documented == set()
    assert documented - code_keys() == set(), "documented keys the node does not read"


# -- the conformance statement's query keys ------------------------------------------------------

#: Per VR: a valid single value, a wildcard, a list of two, a range (None: not a range VR).
_PROBES = {
    "UI": ("1.2.3", "1.2.*", "1.2.3\\1.2.4", None),
    "DA": ("20260101", "2026*", "20260101\\20260102", "20260101-20260201"),
    "TM": ("0915", "09*", "0915\\1000", "0900-1000"),
    "IS": ("7", "7*", "7\\8", None),
    "US": ("7", "7*", "7\\8", None),
    "CS": ("MG", "M*", "MG\\CT", None),
}


def matching_of(keyword: str) -> str:
    """What node/query.py accepts for a key, found by asking it: each kind of value is tried
    and kept when the key takes it as that kind of condition."""
    from node.query import ATTRIBUTES, QueryError, key_match

    a = ATTRIBUTES[keyword]
    if not a.matchable:
        return "return key"
    single, wild, pair, span = _PROBES.get(a.vr, ("AB", "A*", "AB\\CD", None))

    def takes(value: str | None, ops: set[str], n: int = 0) -> bool:
        if value is None:
            return False
        try:
            m = key_match(keyword, value)
        except QueryError:
            return False
        return m is not None and m.op in ops and (not n or len(m.value) == n)

    kinds = [
        ("single value", takes(single, {"eq", "eq_ci", "prefix", "in", "int", "modalities"})),
        ("wildcard", takes(wild, {"like", "like_ci"})),
        ("list", takes(pair, {"in", "modalities"}, 2)),
        ("range", takes(span, {"range"})),
    ]
    return ", ".join(k for k, ok in kinds if ok)


def query_key_rows() -> list[str]:
    """The statement's query key table as node/query.py's attribute table makes it."""
    from pydicom.datadict import tag_for_keyword

    from node.query import ATTRIBUTES

    rows = []
    for kw, a in ATTRIBUTES.items():
        tag = tag_for_keyword(kw)
        assert tag is not None, kw
        rows.append(
            f"| {kw} | `({tag >> 16:04X},{tag & 0xFFFF:04X})` | {a.level} | {a.vr} | "
            f"{matching_of(kw)} |"
        )
    return rows


def test_the_conformance_query_keys_are_the_attribute_table():
    text = (ROOT / "docs" / "conformance.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- table: query-keys -->\n(.*?)<!-- end -->", text, re.S)
    assert m, "the query-keys table is missing from docs/conformance.md"
    documented = [
        line for line in m.group(1).splitlines() if not line.startswith(("| Key", "|---"))
    ]
    expected = query_key_rows()
    assert documented == expected, "docs/conformance.md query-keys should read:\n" + "\n".join(
        expected
    )


def test_the_matching_probe_tells_the_kinds_apart():
    assert matching_of("StudyDate") == "single value, range"
    assert matching_of("PatientName") == "single value, wildcard"
    assert matching_of("Modality") == "single value, wildcard, list"
    assert matching_of("ModalitiesInStudy") == "single value, list"
    assert matching_of("SOPInstanceUID") == "single value, list"
    assert matching_of("Rows") == "single value"
    assert matching_of("NumberOfStudyRelatedInstances") == "return key"
