"""Render a Grayscale Softcopy Presentation State with DCMTK: ``dcmp2pgm`` applies it to the
image (VOI window, displayed area) and dumps the graphic layers it parsed (it does not burn
graphics into its bitmap); the polylines and text boxes of that dump are drawn onto its
bitmap, so the picture shows what DCMTK read from the object, not what we wrote."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


@dataclass
class Parsed:
    texts: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    polylines: list[list[tuple[float, float]]] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    dump: str = ""


def dcmp2pgm(pr: Path, image: Path, pgm: Path) -> Parsed:
    r = subprocess.run(
        ["/usr/bin/dcmp2pgm", "-v", "-p", str(pr), str(image), str(pgm)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode != 0:
        raise RuntimeError(f"dcmp2pgm failed ({r.returncode}): {r.stdout}{r.stderr}")
    out = Parsed(dump=r.stdout + r.stderr)
    text: str | None = None
    for line in out.dump.splitlines():
        line = line[3:] if line.startswith("I: ") else line
        if m := re.match(r"Graphic Layer #\d+ \[(.*)\]", line):
            out.layers.append(m.group(1))
        elif m := re.match(r'\s+text \d+: "(.*)"', line):
            text = m.group(1)
        elif (
            m := re.match(r"\s+bounding box: TLHC=([\d.]+)\\([\d.]+) BRHC=([\d.]+)\\([\d.]+)", line)
        ) and text is not None:
            out.texts.append((text, tuple(float(v) for v in m.groups())))  # type: ignore[arg-type]
            text = None
        elif m := re.match(r"\s+coordinates: (.*)", line):
            pts = [p for p in m.group(1).split(",") if p.strip()]
            out.polylines.append([(float(p.split("\\")[0]), float(p.split("\\")[1])) for p in pts])
    return out


def render_png(pr: Path, image: Path, png: Path) -> Parsed:
    pgm = png.with_suffix(".pgm")
    parsed = dcmp2pgm(pr, image, pgm)
    img = Image.open(pgm).convert("RGB")
    draw = ImageDraw.Draw(img)
    fs = max(14, img.size[1] // 50)
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=fs)
    except TypeError:
        font = ImageFont.load_default()
    for poly in parsed.polylines:
        draw.line(poly, fill=(255, 255, 0), width=max(2, fs // 6))
    for text, (x0, y0, _x1, _y1) in parsed.texts:
        draw.text((x0, y0), text, fill=(255, 255, 0), font=font)
    img.save(png)
    pgm.unlink()
    return parsed
