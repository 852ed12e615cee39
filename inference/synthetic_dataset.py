"""``mammo-node synth``: synthetic phantom exams in the VinDr-Mammo layout.

Each breast draws a BI-RADS category; its lesions follow from it, so a model can learn:

=========  ===========================================  =========
BI-RADS    finding (in both views of the breast)        diagnosis
=========  ===========================================  =========
1          none                                         normal
2          faint, small, round mass                     benign
3          round mass, medium contrast                  benign
4          irregular mass with faint spicules           malignant
5          large spiculated mass with calcifications    malignant
=========  ===========================================  =========

Each exam draws a BI-RADS density A-D (both breasts), written to ``breast_density``; with
``density_phantoms`` the phantoms' fibroglandular share follows it
(``inference.synthetic.FIBROGLANDULAR``).

Header dialects, MONOCHROME1 and compressed transfer syntaxes vary between exams, and a few
exams miss a view, as real archives do.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import JPEGLSLossless, generate_uid

from inference.synthetic import (
    ARTIFACTS,
    UID_ROOT,
    Lesion,
    film_lesion_boxes,
    film_size,
    lesion_boxes,
    make_mammogram,
    write,
)

BIRADS_P = [0.4, 0.15, 0.15, 0.15, 0.15]
DIAGNOSIS = {1: "normal", 2: "benign", 3: "benign", 4: "malignant", 5: "malignant"}
FINDING_FIELDS = [
    "study_id",
    "series_id",
    "image_id",
    "laterality",
    "view_position",
    "height",
    "width",
    "breast_birads",
    "breast_density",
    "finding_categories",
    "finding_birads",
    "xmin",
    "ymin",
    "xmax",
    "ymax",
    "split",
]
FIELDS = [
    "study_id",
    "series_id",
    "image_id",
    "laterality",
    "view_position",
    "height",
    "width",
    "breast_birads",
    "breast_density",
    "split",
    "breast_diagnosis",
]


def lesions_for(birads: int, rng: np.random.Generator) -> list[tuple[Lesion, float]]:
    """Lesions of one breast (with the vertical position of each in MLO)."""
    x, y = rng.uniform(0.3, 0.75), rng.uniform(0.25, 0.75)
    y_mlo = float(np.clip(y + rng.normal(0, 0.08), 0.15, 0.85))
    if birads == 1:
        return []
    if birads == 2:
        les = [Lesion("mass", x, y, rng.uniform(0.02, 0.03), rng.uniform(0.10, 0.15))]
    elif birads == 3:
        les = [Lesion("mass", x, y, rng.uniform(0.035, 0.05), rng.uniform(0.18, 0.25))]
    elif birads == 4:
        les = [Lesion("spiculated", x, y, rng.uniform(0.035, 0.05), rng.uniform(0.2, 0.28))]
    else:
        les = [
            Lesion("spiculated", x, y, rng.uniform(0.055, 0.08), rng.uniform(0.3, 0.4)),
            Lesion("calcifications", x, y, 0.05, 0.3),
        ]
    return [(le, y_mlo) for le in les]


def write_synthetic_dataset(
    out: str | Path,
    exams: int,
    seed: int = 0,
    rows: int = 1024,
    cols: int = 832,
    test_fraction: float = 0.2,
    progress: bool = True,
    artifacts: float = 0.0,
    density_phantoms: bool = False,
    film: bool = False,
) -> Path:
    """Write ``exams`` synthetic exams under ``out`` (VinDr layout); returns the CSV path.

    ``artifacts``: the share of images that carry film / vendor artifacts (view labels,
    markers, rulers, film edges, collimator shadows; each kind with probability 1/2), drawn
    from their own random stream so that the rest of the data set does not change.
    ``density_phantoms``: the phantoms' fibroglandular share follows the exam's density label
    (off: the mild texture the bundled demo checkpoint was trained on; its readings of dense
    phantoms are not meaningful until it is retrained with them).
    ``film``: digitised screen-film images instead (:func:`inference.synthetic.film_image`:
    grain, film edges, scanner borders, a label, a large dark background, no window), each
    of its own size within 4,400-4,700 x 2,600-2,900 (``rows`` / ``cols`` are not used),
    12 or 16 bits stored; ``artifacts`` does not apply to them."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    art_rng = np.random.default_rng([seed, 0xA27])
    rows_out = []
    findings = []
    it = range(exams)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="synth", unit="exam")
    for e in it:
        # UIDs from the seed too: the same seed writes the same data set, files and all.
        study = generate_uid(prefix=UID_ROOT, entropy_srcs=[f"synth|{seed}|{e}|study"])
        series = generate_uid(prefix=UID_ROOT, entropy_srcs=[f"synth|{seed}|{e}|series"])
        split = "test" if rng.random() < test_fraction else "training"
        dialect = str(rng.choice(["standard", "code-only", "srt", "legacy"]))
        photometric = "MONOCHROME1" if rng.random() < 0.15 else "MONOCHROME2"
        ts = JPEGLSLossless if rng.random() < 0.1 else None
        drop = str(rng.choice(["L-CC", "L-MLO", "R-CC", "R-MLO"])) if rng.random() < 0.05 else ""
        density = str(rng.choice(["A", "B", "C", "D"]))
        for lat in ("L", "R"):
            birads = int(rng.choice([1, 2, 3, 4, 5], p=BIRADS_P))
            lesions = lesions_for(birads, rng)
            for view in ("CC", "MLO"):
                if f"{lat}-{view}" == drop:
                    continue
                les = [
                    Lesion(le.kind, le.x, y_mlo if view == "MLO" else le.y, le.radius, le.contrast)
                    for le, y_mlo in lesions
                ]
                kw: dict[str, Any] = dict(transfer_syntax=ts) if ts else {}
                ih, iw = rows, cols
                if film:
                    size_seed = int(art_rng.integers(1 << 31))
                    ih, iw = film_size(size_seed)
                    kw.update(film=True, bits_stored=int(art_rng.choice([12, 16])))
                elif artifacts and art_rng.random() < artifacts:
                    kinds = [a for a in ARTIFACTS if art_rng.random() < 0.5]
                    kw["artifacts"] = tuple(kinds or [str(art_rng.choice(ARTIFACTS))])
                img_seed = int(rng.integers(1 << 31))
                ds = make_mammogram(
                    lat,
                    view,
                    rows=ih,
                    cols=iw,
                    seed=img_seed,
                    sop_uid=generate_uid(
                        prefix=UID_ROOT, entropy_srcs=[f"synth|{seed}|{e}|{lat}{view}"]
                    ),
                    lesions=les,
                    dialect=dialect,
                    photometric=photometric,
                    study_uid=study,
                    series_uid=series,
                    patient_id=f"SYN{seed:03d}{e:06d}",
                    accession=f"S{seed % 1000:03d}{e:06d}",
                    density=density if density_phantoms else None,
                    **kw,
                )
                image_id = ds.SOPInstanceUID
                write(ds, out / "images" / study / f"{image_id}.dicom")
                rows_out.append(
                    {
                        "study_id": study,
                        "series_id": series,
                        "image_id": image_id,
                        "laterality": lat,
                        "view_position": view,
                        "height": ih,
                        "width": iw,
                        "breast_birads": f"BI-RADS {birads}",
                        "breast_density": f"DENSITY {density}",
                        "split": split,
                        "breast_diagnosis": DIAGNOSIS[birads],
                    }
                )
                # Where each lesion lies (the VinDr finding layout): localisation in evaluate.
                boxes = (film_lesion_boxes if film else lesion_boxes)(lat, ih, iw, img_seed, les)
                for le, (_, _, x0, y0, x1, y1) in zip(les, boxes):
                    findings.append(
                        {
                            "study_id": study,
                            "series_id": series,
                            "image_id": image_id,
                            "laterality": lat,
                            "view_position": view,
                            "height": ih,
                            "width": iw,
                            "breast_birads": f"BI-RADS {birads}",
                            "breast_density": f"DENSITY {density}",
                            "finding_categories": f"['{le.kind}']",
                            "finding_birads": f"BI-RADS {birads}",
                            "xmin": round(x0, 1),
                            "ymin": round(y0, 1),
                            "xmax": round(x1, 1),
                            "ymax": round(y1, 1),
                            "split": split,
                        }
                    )
    csv_path = out / "breast-level_annotations.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows_out)
    with open(out / "finding_annotations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FINDING_FIELDS)
        w.writeheader()
        w.writerows(findings)
    return csv_path
