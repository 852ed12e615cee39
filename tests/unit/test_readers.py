"""The public data sets in their own published layouts (column names, file naming, folder
depth), built here with synthetic images: cbis-ddsm, rsna, cmmd, inbreast."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from inference.datasets import read_dataset
from inference.synthetic import make_mammogram, write
from inference.tasks import DIAGNOSIS_CLASSES

pytestmark = pytest.mark.unit

MALIGNANT, BENIGN, NORMAL = (DIAGNOSIS_CLASSES.index(c) for c in ("malignant", "benign", "normal"))


def _img(path: Path, lat: str, view: str, **kw) -> Path:
    return write(make_mammogram(lat, view, rows=48, cols=40, **kw), path)


def _csv(path: Path, header: str, rows: list[str], sep: str = ",") -> None:
    path.write_text("\n".join([header, *rows]) + "\n")


# -------------------------------------------------------------------------------- RSNA
def test_rsna_layout(tmp_path):
    header = (
        "site_id,patient_id,image_id,laterality,view,age,cancer,biopsy,invasive,BIRADS,"
        "implant,density,machine_id,difficult_negative_case"
    )
    rows = []
    for pid, cancer, biopsy, birads in (
        ("10006", 0, 0, "1"),
        ("10011", 1, 1, ""),
        ("10025", 0, 1, "0"),
    ):
        for k, (lat, view) in enumerate(
            (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"), ("L", "AT"))
        ):
            iid = f"{pid}{k:03d}"
            _img(
                tmp_path / "train_images" / pid / f"{iid}.dcm", lat, view if view != "AT" else "CC"
            )
            cancer_here = cancer if lat == "L" else 0
            rows.append(
                f"2,{pid},{iid},{lat},{view},61.0,{cancer_here},{biopsy},0,{birads},0,B,49,False"
            )
    _csv(tmp_path / "train.csv", header, rows)
    exams = {r.exam_id: r for r in read_dataset(tmp_path, "rsna")}
    assert set(exams) == {"10006", "10011", "10025"}
    assert all(set(r.paths) == {"L-CC", "L-MLO", "R-CC", "R-MLO"} for r in exams.values())
    assert exams["10011"].diagnosis == {"L": MALIGNANT, "R": BENIGN}
    assert exams["10011"].birads["L"] == 5
    assert exams["10006"].birads == {"L": 1, "R": 1} and exams["10006"].diagnosis["R"] == NORMAL
    assert exams["10025"].birads == {}  # BI-RADS 0 = recall: no category
    assert {r.split for r in exams.values()} <= {"training", "test"}
    assert read_dataset(tmp_path, "rsna")[0].split == exams["10006"].split  # fixed


# --------------------------------------------------------------------------- CBIS-DDSM
MASS_HEADER = (
    "patient_id,breast_density,left or right breast,image view,abnormality id,"
    "abnormality type,mass shape,mass margins,assessment,pathology,subtlety,"
    "image file path,cropped image file path,ROI mask file path"
)
CALC_HEADER = (
    "patient_id,breast density,left or right breast,image view,abnormality id,"
    "abnormality type,calc type,calc distribution,assessment,pathology,subtlety,"
    "image file path,cropped image file path,ROI mask file path"
)


def _cbis_case(root: Path, case: str, lat: str, view: str, n: int) -> str:
    """A case folder as TCIA's downloader names it; the CSV path with the UIDs."""
    study = f"1.3.6.1.4.1.9590.100.1.2.{4221127222131896498076 + n}{74994 + n}"
    series = f"1.3.6.1.4.1.9590.100.1.2.{3423861948112676366086 + n}{24515 + n}"
    folder = (
        root
        / "CBIS-DDSM"
        / case
        / f"07-20-2016-DDSM-{str(74994 + n)[-5:]}"
        / f"1.000000-full mammogram images-{str(24515 + n)[-5:]}"
    )
    _img(folder / "1-1.dcm", lat, view, study_uid=study, series_uid=series)
    # Another series in the same case folder (a second download): the series UID decides.
    _img(
        folder.parent / "1.000000-full mammogram images-99999" / "1-1.dcm",
        lat,
        view,
        study_uid=study,
    )
    # The ROI masks and crops of the same abnormality: other case folders, other series.
    roi = (
        root
        / "CBIS-DDSM"
        / f"{case}_1"
        / f"07-21-2016-DDSM-{n:05d}"
        / f"1.000000-ROI mask images-{n:05d}"
    )
    _img(roi / "1-1.dcm", lat, view, study_uid=study)
    _img(roi / "1-2.dcm", lat, view, study_uid=study)
    return f"{case}/{study}/{series}/000000.dcm"


def test_cbis_ddsm_layout(tmp_path):
    mass_train, calc_train, mass_test = [], [], []
    n = 0
    for lat, side in (("L", "LEFT"), ("R", "RIGHT")):
        for view in ("CC", "MLO"):
            n += 1
            path = _cbis_case(tmp_path, f"Mass-Training_P_00001_{side}_{view}", lat, view, n)
            mass_train.append(
                f"P_00001,3,{side},{view},1,mass,OVAL,CIRCUMSCRIBED,"
                f"{4 if lat == 'L' else 2},"
                f"{'MALIGNANT' if lat == 'L' else 'BENIGN_WITHOUT_CALLBACK'},"
                f"4,{path},crop/000000.dcm,roi/000001.dcm"
            )
    n += 1
    path = _cbis_case(tmp_path, "Calc-Training_P_00001_LEFT_CC", "L", "CC", n)
    calc_train.append(
        f"P_00001,3,LEFT,CC,1,calcification,PLEOMORPHIC,CLUSTERED,5,MALIGNANT,"
        f"5,{path},crop/000000.dcm,roi/000001.dcm"
    )
    n += 1
    path = _cbis_case(tmp_path, "Mass-Test_P_00016_LEFT_CC", "L", "CC", n)
    mass_test.append(
        f"P_00016,2,LEFT,CC,1,mass,IRREGULAR,SPICULATED,0,BENIGN,3,{path},"
        f"crop/000000.dcm,roi/000001.dcm"
    )
    _csv(tmp_path / "mass_case_description_train_set.csv", MASS_HEADER, mass_train)
    _csv(tmp_path / "calc_case_description_train_set.csv", CALC_HEADER, calc_train)
    _csv(tmp_path / "mass_case_description_test_set.csv", MASS_HEADER, mass_test)
    exams = {r.exam_id: r for r in read_dataset(tmp_path, "cbis-ddsm")}
    assert set(exams) == {"P_00001|training", "P_00016|test"}
    a = exams["P_00001|training"]
    assert set(a.paths) == {"L-CC", "L-MLO", "R-CC", "R-MLO"}
    # The full mammogram, not the ROI mask of another folder with the same study.
    assert all(
        "full mammogram images" in str(p) and "99999" not in str(p) for p in a.paths.values()
    )
    assert a.diagnosis == {"L": MALIGNANT, "R": BENIGN} and a.birads == {"L": 5, "R": 2}
    assert a.split == "training" and exams["P_00016|test"].split == "test"
    assert exams["P_00016|test"].birads == {}  # assessment 0: no category


def _cbis_roi(
    root: Path,
    case: str,
    lat: str,
    view: str,
    n: int,
    box: tuple[int, ...],
    same_series: bool = True,
    size: tuple[int, int] = (48, 40),
) -> tuple[str, str]:
    """An abnormality's ROI mask (two-valued, the mammogram's size, foreground ``box`` =
    x0, y0, x1, y1) and cropped image as TCIA's download has them; the CSV's (ROI mask,
    cropped image) paths, swapped as in many CBIS-DDSM rows."""
    import numpy as np

    study = f"1.3.6.1.4.1.9590.100.1.2.{4221127222131896498076 + n}{74994 + n}"
    s_mask = f"1.3.6.1.4.1.9590.100.1.2.{5523861948112676366086 + n}{31415 + n}"
    s_crop = s_mask if same_series else f"1.3.6.1.4.1.9590.100.1.2.77{n}"
    folder = root / "CBIS-DDSM" / f"{case}_1" / f"07-21-2016-DDSM-{n:05d}"
    mask = np.zeros(size)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1.0
    crop_dir = folder / (
        f"1.000000-ROI mask images-{n:05d}" if same_series else f"1.000000-cropped images-{n:05d}"
    )
    write(
        make_mammogram(
            lat,
            view,
            pixels=np.full((12, 10), 0.4) + np.eye(12, 10) * 0.3,
            study_uid=study,
            series_uid=s_crop,
        ),
        crop_dir / "1-1.dcm",
    )
    write(
        make_mammogram("L", view, pixels=mask, study_uid=study, series_uid=s_mask),
        folder / f"1.000000-ROI mask images-{n:05d}" / ("1-2.dcm" if same_series else "1-1.dcm"),
    )
    return (
        f"{case}_1/{study}/{s_crop}/000000.dcm",  # named the mask, is the crop
        f"{case}_1/{study}/{s_mask}/000001.dcm",
    )


def test_cbis_ddsm_lesion_boxes_from_roi_masks(tmp_path, caplog):
    rows = []
    cases = (
        ("L", "LEFT", "CC", "MALIGNANT", (5, 10, 17, 22), True, (48, 40)),
        ("L", "LEFT", "MLO", "MALIGNANT", (20, 30, 31, 44), False, (48, 40)),
        ("R", "RIGHT", "CC", "BENIGN", (2, 2, 9, 9), True, (48, 40)),
        ("R", "RIGHT", "MLO", "MALIGNANT", (2, 2, 9, 9), True, (40, 40)),
    )  # wrong size
    for n, (lat, side, view, pathology, box, same, size) in enumerate(cases, start=1):
        case = f"Mass-Training_P_00007_{side}_{view}"
        full = _cbis_case(tmp_path, case, lat, view, n)
        roi, crop = _cbis_roi(tmp_path, case, lat, view, n, box, same, size)
        rows.append(
            f"P_00007,2,{side},{view},1,mass,OVAL,CIRCUMSCRIBED,4,{pathology},4,{full},{crop},{roi}"
        )
    _csv(tmp_path / "mass_case_description_train_set.csv", MASS_HEADER, rows)
    with caplog.at_level("WARNING", logger="mammo_node.data"):
        (rec,) = read_dataset(tmp_path, "cbis-ddsm")
    # the mask's foreground, as pixel edges; the benign one and the mismatched mask: no box
    assert rec.lesions == {"L-CC": [(5.0, 10.0, 17.0, 22.0)], "L-MLO": [(20.0, 30.0, 31.0, 44.0)]}
    assert "1 malignant abnormalit(y/ies) without a usable ROI mask" in caplog.text


# -------------------------------------------------------------------------------- CMMD
def _xlsx(path: Path, rows: list[list[str]]) -> None:
    """A minimal .xlsx (shared strings, one sheet), as a spreadsheet program writes it."""
    strings = sorted({c for r in rows for c in r})
    idx = {s: i for i, s in enumerate(strings)}

    def col(i: int) -> str:
        return chr(65 + i)

    sheet = "".join(
        f'<row r="{r + 1}">'
        + "".join(f'<c r="{col(i)}{r + 1}" t="s"><v>{idx[v]}</v></c>' for i, v in enumerate(row))
        + "</row>"
        for r, row in enumerate(rows)
    )
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "xl/sharedStrings.xml",
            f"<sst {ns}>" + "".join(f"<si><t>{s}</t></si>" for s in strings) + "</sst>",
        )
        z.writestr(
            "xl/worksheets/sheet1.xml",
            f"<worksheet {ns}><sheetData>{sheet}</sheetData></worksheet>",
        )


def test_cmmd_layout(tmp_path):
    for pid, sides in (("D1-0001", "LR"), ("D2-0005", "R")):
        folder = tmp_path / "CMMD" / pid / "07-18-2010-NA-NA-79377" / "1.000000-NA-70244"
        k = 0
        for lat in sides:
            for view in ("CC", "MLO"):
                k += 1
                _img(folder / f"1-{k}.dcm", lat, view, dialect="code-only")
    _xlsx(
        tmp_path / "CMMD_clinicaldata_revision.xlsx",
        [
            ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"],
            ["D1-0001", "L", "44", "1", "calcification", "Benign", ""],
            ["D2-0005", "R", "62", "1", "both", "Malignant", "Luminal B"],
        ],
    )
    exams = {r.exam_id: r for r in read_dataset(tmp_path, "cmmd")}
    assert set(exams["D1-0001"].paths) == {"L-CC", "L-MLO", "R-CC", "R-MLO"}
    assert set(exams["D2-0005"].paths) == {"R-CC", "R-MLO"}
    assert exams["D1-0001"].diagnosis == {"L": BENIGN}
    assert exams["D2-0005"].diagnosis == {"R": MALIGNANT}
    assert exams["D1-0001"].birads == {}


# ---------------------------------------------------------------------------- INbreast
def test_inbreast_layout(tmp_path):
    rows = []
    for fid, patient, lat, view, birads in (
        ("20586908", "6c613a14b80a8591", "R", "CC", "4a"),
        ("20586934", "6c613a14b80a8591", "R", "ML", "4c"),
        ("20586960", "6c613a14b80a8591", "L", "CC", "1"),
        ("20586986", "6c613a14b80a8591", "L", "ML", "2"),
        ("22678622", "61b13c59bcba149e", "L", "CC", "6"),
    ):
        _img(
            tmp_path / "AllDICOMs" / f"{fid}_{patient}_MG_{lat}_{view}_ANON.dcm",
            lat,
            "MLO" if view == "ML" else view,
        )
        rows.append(
            f"removed;removed;{lat};{'MLO' if view == 'ML' else view};201001;{fid};2;{birads}"
        )
    _csv(
        tmp_path / "INbreast.csv",
        "Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads",
        rows,
    )
    exams = {r.exam_id.split("|")[0]: r for r in read_dataset(tmp_path, "inbreast")}
    a = exams["6c613a14b80a8591"]
    assert set(a.paths) == {"L-CC", "L-MLO", "R-CC", "R-MLO"}
    assert a.birads == {"R": 4, "L": 2}
    b = exams["61b13c59bcba149e"]
    assert b.birads == {"L": 5} and b.diagnosis == {"L": MALIGNANT}


def _inbreast_xml(path: Path, rois: list[tuple[str, list[tuple[float, float]]]]) -> None:
    """An INbreast ROI file: the plist its annotation tool (OsiriX) writes."""
    import plistlib

    doc = {
        "Images": [
            {
                "ImageIndex": 0,
                "NumberOfROIs": len(rois),
                "ROIs": [
                    {
                        "Name": name,
                        "NumberOfPoints": len(pts),
                        "IndexInImage": i,
                        "Type": 15,
                        "Area": 1.0,
                        "Center": "(0.000000, 0.000000, 0.000000)",
                        "Point_mm": [f"({x * 0.07:.6f}, {y * 0.07:.6f}, 0.000000)" for x, y in pts],
                        "Point_px": [f"({x:.6f}, {y:.6f})" for x, y in pts],
                    }
                    for i, (name, pts) in enumerate(rois)
                ],
            }
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        plistlib.dump(doc, f, fmt=plistlib.FMT_XML)


def test_inbreast_lesion_boxes_from_xml_contours(tmp_path, caplog):
    rows = []
    for fid, lat, view, birads in (
        ("30011", "R", "CC", "4b"),
        ("30012", "R", "ML", "5"),
        ("30013", "L", "CC", "2"),
        ("30014", "L", "ML", "6"),
    ):
        _img(
            tmp_path / "AllDICOMs" / f"{fid}_aa11bb22cc33dd44_MG_{lat}_{view}_ANON.dcm",
            lat,
            "MLO" if view == "ML" else view,
        )
        rows.append(f"removed;removed;{lat};{view};201104;{fid};3;{birads}")
    _csv(
        tmp_path / "INbreast.csv",
        "Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads",
        rows,
    )
    mass = [(10.5, 12.0), (20.25, 11.0), (22.0, 25.5), (12.0, 24.0)]
    _inbreast_xml(
        tmp_path / "AllXML" / "30011.xml",
        [
            ("Mass", mass),
            ("Calcification", [(30.0, 30.0)]),
            ("Cluster", [(3.0, 4.0), (8.0, 4.0), (8.0, 9.0)]),
            ("Point 1", [(1.0, 1.0), (2.0, 2.0)]),
        ],
    )
    _inbreast_xml(tmp_path / "AllXML" / "30012.xml", [("Spiculated Region", mass)])
    _inbreast_xml(tmp_path / "AllXML" / "30013.xml", [("Mass", mass)])  # Bi-Rads 2: benign
    (tmp_path / "AllXML" / "30014.xml").write_text("<plist><dict><key>Images")  # broken
    with caplog.at_level("WARNING", logger="mammo_node.data"):
        (rec,) = read_dataset(tmp_path, "inbreast")
    assert rec.lesions == {
        "R-CC": [(10.5, 11.0, 22.0, 25.5), (3.0, 4.0, 8.0, 9.0)],
        "R-MLO": [(10.5, 11.0, 22.0, 25.5)],
    }
    assert "30014.xml: not an INbreast ROI plist" in caplog.text
    assert rec.birads == {"R": 5, "L": 5}  # the broken file costs the boxes only


def test_missing_layout_says_what_is_expected(tmp_path):
    for fmt, needle in (
        ("rsna", "train.csv"),
        ("inbreast", "AllDICOMs"),
        ("cbis-ddsm", "case description"),
        ("cmmd", "CMMD_clinicaldata"),
    ):
        with pytest.raises(FileNotFoundError, match=needle):
            read_dataset(tmp_path, fmt)
