"""Unit layer: SR / SC builders from a plain reading, the whole-dataset validator, config,
tokens and the audit reader. No processes, no network (pytest -m unit)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from inference.synthetic import make_exam, make_mammogram, write
from node.results import (
    build_mammo_cad,
    build_sc,
    build_tid1500,
    result_uid,
)
from node.validate import DatasetInvalid, check_dataset
from tests.helpers import reading_summary

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sources():
    exam = make_exam(seed=7, rows=64, cols=48)
    return {f"{ds.ImageLaterality}-{ds.ViewPosition}": ds for ds in exam}


def test_mammo_cad_sr_from_a_reading(sources):
    study = next(iter(sources.values())).StudyInstanceUID
    sr = build_mammo_cad(sources, reading_summary(), study, 1)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.50"
    assert sr.StudyInstanceUID == study and sr.SOPInstanceUID == result_uid(
        study, 1, "sr-mammo-cad"
    )
    text = json.dumps(sr.to_json_dict(), default=str)
    for needle in (
        "Image Library",
        "397145000",
        "Mammography assessment (Category 5)",
        "397140005",
        "NOT FOR CLINICAL USE",
        "HybridCnnVssm",
        "Fusion weight of L-CC",
        "AI exam malignancy score",
        "AI breast malignancy score",
        "Operating point",
        "Exam score above the operating point",
        "373066001",
        "Exam score 85/100, above the operating point (40)",
    ):
        assert needle in text, needle
    assert all(ds.SOPInstanceUID in text for ds in sources.values())
    assert sr.SoftwareVersions.startswith("mammo-node ")
    v2 = build_mammo_cad(sources, reading_summary(demo=False), study, 2, replaces=sr)
    assert "NOT FOR CLINICAL USE" not in json.dumps(v2.to_json_dict(), default=str)
    assert (
        v2.PredecessorDocumentsSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == sr.SOPInstanceUID
    )


def test_tid1500_and_secondary_capture(sources):
    study = next(iter(sources.values())).StudyInstanceUID
    sr = build_tid1500(sources, reading_summary(), study, 1)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    text = json.dumps(sr.to_json_dict(), default=str)
    assert "397145000" in text and "Mammography assessment (Category 5)" in text
    for needle in ("AI exam malignancy score", "{score}", "Operating point", "373066001"):
        assert needle in text, needle
    src = sources["L-CC"]
    display = np.linspace(0, 1, src.Rows * src.Columns).reshape(src.Rows, src.Columns)
    attention = np.zeros_like(display)
    attention[10:20, 10:20] = 1.0
    sc = build_sc(src, "L-CC", display, attention, reading_summary(), study, 1, 1)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3


# -- the whole-dataset validator --------------------------------------------------------
def test_validator_accepts_whole_files_and_refuses_cut_ones(tmp_path):
    f = write(make_mammogram("L", "CC", rows=64, cols=64), tmp_path / "a.dcm")
    assert check_dataset(f, 1 << 30) is None
    data = f.read_bytes()
    for cut in (200, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.dcm"
        p.write_bytes(data[:cut])
        with pytest.raises(DatasetInvalid) as e:
            check_dataset(p, 1 << 30)
        assert e.value.status == 0xC210
    p = tmp_path / "trailing.dcm"
    p.write_bytes(data + b"\x00\x01\x02")
    with pytest.raises(DatasetInvalid):
        check_dataset(p, 1 << 30)


def test_validator_encapsulated_and_deflated(tmp_path):
    from pydicom.uid import RLELossless

    f = write(
        make_mammogram("L", "CC", rows=64, cols=64, transfer_syntax=RLELossless),
        tmp_path / "rle.dcm",
    )
    assert check_dataset(f, 1 << 30) is None
    d = write(
        make_mammogram("L", "CC", rows=64, cols=64, transfer_syntax=DeflatedExplicitVRLittleEndian),
        tmp_path / "deflated.dcm",
    )
    inflated = check_dataset(d, 1 << 30, scratch=tmp_path)
    assert inflated is not None and inflated.stat().st_size > 64 * 64 * 2
    inflated.unlink()
    with pytest.raises(DatasetInvalid) as e:
        check_dataset(d, 4096, scratch=tmp_path)  # inflates beyond the cap
    assert e.value.status == 0xA700
    assert not list(tmp_path.glob("inflated-*"))  # the scratch copy is removed
    raw = d.read_bytes()
    bad = tmp_path / "bad-deflate.dcm"
    bad.write_bytes(raw[:-10])  # the deflate stream cut short
    with pytest.raises(DatasetInvalid, match="deflate"):
        check_dataset(bad, 1 << 30, scratch=tmp_path)


def _stream(data: bytes, chunks, max_bytes: int = 1 << 30) -> int:
    """Feed ``data`` to a StreamCheck in the given chunk sizes (cycled); the bytes fed
    before it refused (DatasetInvalid raised) or len(data) when it accepted."""
    from itertools import cycle

    from node.validate import StreamCheck

    check, pos = StreamCheck(max_bytes), 0
    for size in cycle(chunks):
        if pos >= len(data):
            break
        block = data[pos : pos + size]
        check.feed(block)
        pos += len(block)
    check.finish()
    return pos


def _corpus(tmp_path):
    """Valid and malformed files of every shape the whole-file check knows."""
    from pydicom import dcmread
    from pydicom.uid import ImplicitVRLittleEndian, RLELossless

    from inference.synthetic import make_tomo_volume, set_transfer_syntax, write_tomo_volume

    good = write(make_mammogram("L", "CC", rows=64, cols=64), tmp_path / "a.dcm")
    data = good.read_bytes()
    files = {
        "good": data,
        "cut-200": data[:200],
        "cut-half": data[: len(data) // 2],
        "cut-1": data[:-1],
        "trailing": data + b"\x00\x01\x02",
        "rle": write(
            make_mammogram("L", "CC", rows=64, cols=64, transfer_syntax=RLELossless),
            tmp_path / "rle.dcm",
        ).read_bytes(),
        "implicit": write(
            make_mammogram("R", "MLO", rows=32, cols=32, transfer_syntax=ImplicitVRLittleEndian),
            tmp_path / "imp.dcm",
        ).read_bytes(),
        "deflated": write(
            make_mammogram(
                "L", "CC", rows=64, cols=64, transfer_syntax=DeflatedExplicitVRLittleEndian
            ),
            tmp_path / "defl.dcm",
        ).read_bytes(),
    }
    files["deflated-cut"] = files["deflated"][:-10]
    vol = write_tomo_volume(tmp_path / "v.dcm", frames=12, rows=64, cols=64)
    files["volume"] = vol.read_bytes()
    ds = dcmread(vol)
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:11]
    files["volume-11-items"] = write(ds, tmp_path / "v11.dcm").read_bytes()
    ds = dcmread(vol)
    del ds.SharedFunctionalGroupsSequence
    files["volume-no-shared"] = write(ds, tmp_path / "v0.dcm").read_bytes()
    ds = dcmread(vol)
    ds.NumberOfFrames = 13  # pixel data of 12 frames
    ds.PerFrameFunctionalGroupsSequence = [
        *ds.PerFrameFunctionalGroupsSequence,
        ds.PerFrameFunctionalGroupsSequence[0],
    ]
    files["volume-short-pixels"] = write(ds, tmp_path / "v13.dcm").read_bytes()
    rle_vol = set_transfer_syntax(
        make_tomo_volume("L", "CC", frames=3, rows=16, cols=16), RLELossless
    )
    files["volume-rle"] = write(rle_vol, tmp_path / "vr.dcm").read_bytes()
    files["garbage"] = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4
    files["no-dicm"] = b"\x00" * 300
    return files


def test_stream_check_agrees_with_the_whole_file_check(tmp_path):
    """Every file of the corpus, fed in blocks of many sizes: the stream check accepts what
    the whole-file check accepts and refuses what it refuses, with the same status."""
    corpus = _corpus(tmp_path)
    for name, data in corpus.items():
        p = tmp_path / f"{name}.bin"
        p.write_bytes(data)
        try:
            inflated = check_dataset(p, 1 << 30, scratch=tmp_path)
            if inflated is not None:
                inflated.unlink()
            want = None
        except DatasetInvalid as exc:
            want = exc.status
        for chunks in ((1,), (7, 3), (4096,), (len(data) + 1,), (16384, 5, 100000)):
            try:
                _stream(data, chunks)
                got = None
            except DatasetInvalid as exc:
                got = exc.status
            assert got == want, (name, chunks)
    assert {n for n in corpus if n.startswith("volume")} == {
        "volume",
        "volume-11-items",
        "volume-no-shared",
        "volume-short-pixels",
        "volume-rle",
    }


def test_stream_check_refuses_a_bad_volume_before_its_frames(tmp_path):
    """Wrong per-frame items, missing functional groups, pixel data too short for the
    frames: refused at the header of Pixel Data, before any frame is fed."""
    from node.validate import StreamCheck

    corpus = _corpus(tmp_path)
    pixel_at = corpus["volume"].rindex(b"\xe0\x7f\x10\x00OW")
    for name in ("volume-11-items", "volume-no-shared", "volume-short-pixels"):
        data = corpus[name]
        at = data.rindex(b"\xe0\x7f\x10\x00OW") + 12  # the value starts here
        check = StreamCheck(1 << 30)
        with pytest.raises(DatasetInvalid) as e:
            for pos in range(0, len(data), 1000):
                check.feed(data[pos : pos + 1000])
        assert pos < at, (name, pos, at)
        assert e.value.status == 0xC210
        with pytest.raises(DatasetInvalid):  # and stays refused
            check.feed(b"\x00" * 10)
    assert "Per-frame Functional Groups Sequence holds 11 items" in str(
        _refusal(corpus["volume-11-items"])
    )
    assert pixel_at > 1000  # the header is more than one block


def _refusal(data: bytes) -> DatasetInvalid:
    with pytest.raises(DatasetInvalid) as e:
        _stream(data, (512,))
    return e.value


def test_stream_check_bounds_a_deflate_bomb(tmp_path):
    data = _corpus(tmp_path)["deflated"]
    with pytest.raises(DatasetInvalid) as e:
        _stream(data, (333,), max_bytes=4096)
    assert e.value.status == 0xA700


# -- configuration, tokens, audit ---------------------------------------------------------
def test_peers_match_hosts_and_cidr():
    from node.config import parse_config

    cfg = parse_config(
        {
            "peers": [
                {
                    "ae_title": "PACS",
                    "hosts": ["10.1.2.0/24", "192.168.0.7"],
                    "services": ["store", "find"],
                }
            ]
        }
    )
    p = cfg.peers[0]
    assert p.matches("PACS", "10.1.2.99") and p.matches("PACS", "192.168.0.7")
    assert p.matches("PACS", "::ffff:10.1.2.3")  # IPv4-mapped IPv6
    assert not p.matches("PACS", "10.1.3.1") and not p.matches("OTHER", "10.1.2.1")


def test_tokens_by_hash_with_services():
    from node.config import parse_config
    from node.security import TokenAuth

    digest = hashlib.sha256(b"viewer-token").hexdigest()
    auth = TokenAuth(
        parse_config(
            {
                "dicomweb": {
                    "token": "admin",
                    "tokens": [{"name": "viewer", "sha256": digest, "services": ["qido", "wado"]}],
                }
            }
        )
    )
    assert auth.authenticate("Bearer viewer-token") == ("viewer", frozenset({"qido", "wado"}))
    assert auth.authenticate("Bearer admin")[0] == "token"
    for bad in ("", "Bearer", "Bearer nope", "Basic dmlld2VyLXRva2Vu", "viewer-token"):
        assert auth.authenticate(bad) is None


def test_audit_log_lines_and_filters(tmp_path):
    import datetime as dt

    from node.audit import AuditLog, read_events

    log = AuditLog(tmp_path / "audit.jsonl", "NODE")
    log.event("Query", 0, peer={"ae_title": "A"}, studies=["1.2.3"])
    log.event("Security Alert", 4, peer={"ae_title": "B"})
    log.event("DICOM Instances Transferred", 0, study="1.2.4")
    log.close()
    assert oct((tmp_path / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
    assert [e["event"] for e in read_events(tmp_path / "audit.jsonl", study="1.2.3")] == ["Query"]
    assert len(list(read_events(tmp_path / "audit.jsonl", event="security alert"))) == 1
    future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    assert list(read_events(tmp_path / "audit.jsonl", since=future)) == []


def test_tid1500_anchored_at_the_attention_hot_spot(sources, tmp_path):
    import dataclasses
    import subprocess

    study = next(iter(sources.values())).StudyInstanceUID
    reading = dataclasses.replace(
        reading_summary(),
        attention_regions={
            "L-CC": (10.0, 12.0, 30.0, 40.0),
            "L-MLO": (5.0, 5.0, 9.0, 9.0),
            "R-CC": (1.0, 2.0, 3.0, 4.0),
        },
    )
    sr = build_tid1500(sources, reading, study, 1)
    text = json.dumps(sr.to_json_dict(), default=str)
    assert "POLYLINE" in text and "Image Region" in text
    # Left: the view the fusion weighed most (L-CC 0.6); right: the only view with a region.
    assert sources["L-CC"].SOPInstanceUID in text and sources["R-CC"].SOPInstanceUID in text
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    r = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    assert not [x for x in (r.stdout + r.stderr).splitlines() if x.startswith("Error")]


def test_hottest_region_is_the_box_above_half_the_maximum():
    from node.inference_process import hottest_region

    m = np.zeros((50, 40), np.float32)
    m[10:20, 5:15] = 1.0
    m[30, 30] = 0.4
    assert hottest_region(m) == (5.0, 10.0, 15.0, 20.0)
    assert hottest_region(np.zeros((4, 4))) is None


def test_birads_categories_use_the_standard_snomed_codes():
    from node.results import birads_code

    codes = {c: birads_code(f"BI-RADS {c}") for c in "12345"}
    assert [codes[c].value for c in "12345"] == [
        "397140005",
        "397141009",
        "397143007",
        "397144001",
        "397145000",
    ]
    assert all(c.scheme_designator == "SCT" and len(c.meaning) <= 64 for c in codes.values())
    grouped = birads_code("BI-RADS 4-5")  # a 3-class task's group: no single standard code
    assert grouped.scheme_designator == "99MAMMONODE" and "grouped" in grouped.meaning


def test_parametric_map_in_process(sources):
    """Built here (the worker builds it in its own process) so that a deprecated library call
    in the builder fails the suite (pyproject's filterwarnings), and its values survive."""
    from node.results import build_parametric_map

    ds = sources["L-CC"]
    study = ds.StudyInstanceUID
    att = np.linspace(0, 1, int(ds.Rows) * int(ds.Columns), dtype=np.float32).reshape(
        int(ds.Rows), int(ds.Columns)
    )
    pm = build_parametric_map(ds, "L-CC", att, reading_summary(), study, 1, 1)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert pm.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0].WindowCenter == 0.5
    assert float(np.asarray(pm.pixel_array).max()) == pytest.approx(1.0)
