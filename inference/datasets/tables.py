"""Tables as the public data sets publish them: CSV (comma or semicolon), .xlsx (read from
its XML parts, no spreadsheet library), header names matched loosely."""

from __future__ import annotations

import csv
import re
import zipfile
from pathlib import Path
from xml.etree import ElementTree


def rows_csv(path: Path, delimiter: str | None = None) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        text = f.read()
    if delimiter is None:
        first = text.splitlines()[0] if text else ""
        delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def read_xlsx(path: Path) -> list[dict[str, str]]:
    """The first sheet of an .xlsx file as rows of strings (header = first row). A small
    reader of the Office Open XML parts, so that one table needs no spreadsheet library."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(path) as z:
        shared: list[str] = []
        if "xl/sharedStrings.xml" in z.namelist():
            root = ElementTree.fromstring(z.read("xl/sharedStrings.xml"))
            for si in root.findall("m:si", ns):
                shared.append("".join(t.text or "" for t in si.iter(f"{{{ns['m']}}}t")))
        sheets = sorted(n for n in z.namelist() if re.match(r"xl/worksheets/sheet\d+\.xml$", n))
        if not sheets:
            raise ValueError(f"{path}: no worksheet")
        root = ElementTree.fromstring(z.read(sheets[0]))
    table: list[list[str]] = []
    for row in root.iter(f"{{{ns['m']}}}row"):
        cells: dict[int, str] = {}
        for c in row.findall("m:c", ns):
            letters = re.match(r"[A-Z]*", c.get("r", "")).group(0) or "A"  # type: ignore[union-attr]
            col = 0
            for ch in letters:
                col = col * 26 + ord(ch) - 64
            v = c.find("m:v", ns)
            text = v.text if v is not None and v.text is not None else ""
            if c.get("t") == "s" and text:
                text = shared[int(text)]
            elif c.get("t") == "inlineStr":
                text = "".join(t.text or "" for t in c.iter(f"{{{ns['m']}}}t"))
            cells[col - 1] = text.strip()
        if cells:
            table.append([cells.get(i, "") for i in range(max(cells) + 1)])
    if not table:
        return []
    header = table[0]
    return [{h: (r[i] if i < len(r) else "") for i, h in enumerate(header)} for r in table[1:]]


def read_table(path: Path) -> list[dict[str, str]]:
    if path.suffix.lower() == ".xlsx":
        return read_xlsx(path)
    if path.suffix.lower() == ".xls":
        raise ValueError(f"{path}: the old binary .xls format; save it as .xlsx or CSV")
    return rows_csv(path)


def find_file(root: Path, names: list[str]) -> Path:
    for n in names:
        for cand in (root / n, *root.glob(f"*/{n}")):
            if cand.exists():
                return cand
    raise FileNotFoundError(f"{root}: none of {', '.join(names)} found")


def get_field(row: dict[str, str], *names: str) -> str:
    low = {re.sub(r"[\s_]+", " ", k.strip().lower()): v for k, v in row.items()}
    for n in names:
        if n in low:
            return low[n]
    return ""
