"""Today's screening exams through a real node (worker + export) to DCMTK's storescp: each
vendor convention (Combo with the synthesized image acquired last, 3D-only with GENERATED_2D,
3D-only with only the vendor's name, a view with only a volume, a prior sent with the current
study, implants), and which SOP Instance each result references."""

from __future__ import annotations

import datetime as dt
import json
import subprocess

from pydicom import dcmread

from inference.synthetic import make_exam, make_mammogram, make_tomo_volume
from tests.helpers import dciodvfy_errors, dcmtk, send, wait_for

SIZE = dict(rows=320, cols=256)
TODAY = dt.datetime.now(dt.UTC).replace(tzinfo=None, hour=9, minute=0, second=0, microsecond=0)
CAD, TID1500, SC = (
    "1.2.840.10008.5.1.4.1.1.88.50",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.7",
)


def _texts(item, out: dict[str, list[str]]) -> dict[str, list[str]]:
    for c in item.get("ContentSequence", []):
        name = c.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in c else ""
        if c.ValueType == "TEXT":
            out.setdefault(name, []).append(str(c.TextValue))
        elif c.ValueType == "IMAGE":
            out.setdefault("IMAGE", []).append(
                str(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            )
        elif c.ValueType == "CODE":
            out.setdefault(name, []).append(c.ConceptCodeSequence[0].CodeMeaning)
        _texts(c, out)
    return out


def _synthesized(exam, how: str):
    for ds in exam:
        if how == "generated":
            ds.ImageType = ["DERIVED", "PRIMARY", "TOMOSYNTHESIS", "GENERATED_2D"]
        else:
            ds.SeriesDescription = f"{ds.ImageLaterality}{ds.ViewPosition} C-View"
    return exam


def _volumes(exam):
    return [
        make_tomo_volume(
            d.ImageLaterality,
            d.ViewPosition,
            frames=6,
            rows=SIZE["rows"],
            cols=SIZE["cols"],
            seed=i,
            study_uid=d.StudyInstanceUID,
            patient_id=d.PatientID,
            accession=d.AccessionNumber,
            acquisition=TODAY,
        )
        for i, d in enumerate(exam)
    ]


def test_vendor_conventions_read_the_right_images(node_factory, storescp_factory, tmp_path):
    pacs = storescp_factory()
    node = node_factory(
        {
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}
            ],
            "export": {"max_attempts": 20, "initial_delay_seconds": 0.5, "max_delay_seconds": 1.0},
            "grouping": {"stable_seconds": 3, "prior_after_days": 30, "volume_2d": "mip"},
        },
        worker=True,
    )
    later = TODAY + dt.timedelta(minutes=10)
    # Combo: conventional, then the synthesized image of each view acquired after it.
    combo = make_exam(seed=31, patient_id="PAT-COMBO", acquisition=TODAY, **SIZE)
    combo_synth = _synthesized(
        make_exam(
            seed=32,
            patient_id="PAT-COMBO",
            acquisition=later,
            study_uid=combo[0].StudyInstanceUID,
            **SIZE,
        ),
        "generated",
    )
    # A prior of the same patient, sent along with the current study.
    prior = make_exam(
        seed=33, patient_id="PAT-COMBO", acquisition=TODAY - dt.timedelta(days=400), **SIZE
    )
    # 3D-only with GENERATED_2D: synthesized images and volumes.
    gen = _synthesized(
        make_exam(seed=34, patient_id="PAT-GEN", acquisition=TODAY, **SIZE), "generated"
    )
    gen_vols = _volumes(gen)
    # 3D-only with only the vendor's name (an older system), sent by DCMTK's storescu.
    named = _synthesized(
        make_exam(seed=35, patient_id="PAT-NAMED", acquisition=TODAY, **SIZE), "named"
    )
    # Three 2D views and a view with only a volume (computed: [grouping] volume_2d = mip).
    partial = make_exam(
        seed=36, patient_id="PAT-VOL", acquisition=TODAY, views=("L-CC", "L-MLO", "R-CC"), **SIZE
    )
    (vol_only,) = _volumes(
        [
            make_mammogram(
                "R",
                "MLO",
                rows=8,
                cols=8,
                study_uid=partial[0].StudyInstanceUID,
                patient_id="PAT-VOL",
                accession=partial[0].AccessionNumber,
            )
        ]
    )
    # Implants: BreastImplantPresent YES on the standard views, implant-displaced views too.
    implant = make_exam(seed=37, patient_id="PAT-IMP", acquisition=TODAY, **SIZE)
    for ds in implant:
        ds.BreastImplantPresent = "YES"
    implant_id = [
        make_mammogram(
            lat,
            "CC",
            modifier="implant-displaced",
            seed=90 + i,
            study_uid=implant[0].StudyInstanceUID,
            patient_id="PAT-IMP",
            accession=implant[0].AccessionNumber,
            acquisition=later,
            **SIZE,
        )
        for i, lat in enumerate("LR")
    ]

    assert send(node.port, [*prior, *combo, *combo_synth]) == [0] * 12
    assert send(node.port, [*gen_vols, *gen, *partial, vol_only, *implant, *implant_id]) == [0] * 18
    files = []
    for ds in named:
        f = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(f, enforce_file_format=True)
        files.append(str(f))
    r = subprocess.run(
        [dcmtk("storescu"), "-aec", node.ae_title, "127.0.0.1", str(node.port), *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr

    studies = {"combo": combo, "gen": gen, "named": named, "partial": partial, "implant": implant}
    for exam in studies.values():
        node.wait_exam(exam[0].StudyInstanceUID, "done", timeout=300)
    assert node.exam(prior[0].StudyInstanceUID)["state"] == "prior"  # stored, not read
    wait_for(lambda: len(pacs.files()) == 6 * len(studies), 120, what="every result in the PACS")

    by_study: dict[str, list] = {}
    for f in pacs.files():
        o = dcmread(f)
        by_study.setdefault(o.StudyInstanceUID, []).append(o)
    assert prior[0].StudyInstanceUID not in by_study  # nothing goes into the years-old study
    expect = {
        "combo": ({d.SOPInstanceUID for d in combo}, "conventional 2D"),
        "gen": ({d.SOPInstanceUID for d in gen}, "synthesized 2D"),
        "named": ({d.SOPInstanceUID for d in named}, "synthesized 2D"),
        "partial": ({*(d.SOPInstanceUID for d in partial), vol_only.SOPInstanceUID}, None),
        "implant": ({d.SOPInstanceUID for d in implant}, "conventional 2D"),
    }
    for name, (uids, kind) in expect.items():
        objs = by_study[studies[name][0].StudyInstanceUID]
        (cad,) = [o for o in objs if o.SOPClassUID == CAD]
        (tid,) = [o for o in objs if o.SOPClassUID == TID1500]
        scs = [o for o in objs if o.SOPClassUID == SC]
        content = _texts(cad, {})
        assert set(content["IMAGE"]) == uids, name
        for sr in (cad, tid):
            evidence = {
                i.ReferencedSOPInstanceUID
                for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence
                for i in se.ReferencedSOPSequence
            }
            assert evidence == uids, name
        assert {str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in scs} == uids
        kinds = content["Image kind"]
        if kind:
            assert set(kinds) == {kind}, name
        impression = content["Impression"][0]
        assert "Views read from" in impression
        assert ("Implant present" in impression) == (name == "implant"), name
        if name == "combo":
            assert f"priors available: {TODAY - dt.timedelta(days=400):%Y-%m-%d}" in impression
        if name == "partial":
            assert "computed 2D from the tomosynthesis volume" in kinds
            assert "slab maximum-intensity projection" in impression
        if name == "implant":
            assert content["Implant present"] == ["Yes"]

    # exams --json says which kind each view was read from.
    rows = {e["study_instance_uid"]: e for e in json.loads(node.cli("exams", "--json").stdout)}
    assert set(rows[combo[0].StudyInstanceUID]["view_kinds"].values()) == {"conventional"}
    assert rows[partial[0].StudyInstanceUID]["view_kinds"]["R-MLO"] == "computed"
    assert rows[implant[0].StudyInstanceUID]["implant"] is True
    assert rows[prior[0].StudyInstanceUID]["state"] == "prior"
    assert rows[prior[0].StudyInstanceUID]["prior_rule"] == "age"  # prior_after_days
    # The SR with a computed view and a volume in its evidence is valid DICOM.
    cad_partial = [
        f
        for f in pacs.files()
        if dcmread(f, stop_before_pixels=True).SOPClassUID == CAD
        and dcmread(f).StudyInstanceUID == partial[0].StudyInstanceUID
    ]
    assert dciodvfy_errors(cad_partial[0]) == []

    # mammo-node complete reads the prior on request.
    node.cli("complete", prior[0].StudyInstanceUID)
    assert node.wait_exam(prior[0].StudyInstanceUID, "done", timeout=300)["read_on_request"]
