#!/usr/bin/env python3
"""C-FIND latency at archive scale, on SQLite and on PostgreSQL.

Fills a fresh database with --instances rows (default 100,000: 25,000 four-view studies of
10,000 patients over three years, one series per view), starts a listener on it
(``mammo-node start --role listener``) and times C-FIND queries over one association, each
--repeats times; the reference is a C-ECHO on the same association in the same run.

    python benchmarks/queries.py [--instances 100000] [--repeats 15] [--engines sqlite,postgresql]
    python benchmarks/queries.py --orthanc [--instances 8000] [--repeats 5] [--rounds 3]

--orthanc loads the same studies (header-only files, over its REST API) into Orthanc (the
Debian package, /usr/sbin/Orthanc) and into the node, and runs the same study-level findscu
and pynetdicom queries against both: a one-month StudyDate range and a one-day one.

PostgreSQL: a private server is started from Debian's postgresql binaries (as in the tests).
Goal (issue 12): a study-level query by PatientID or by date range within 50 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from sqlalchemy import insert  # noqa: E402

from benchmarks.common import free_port, wait_port  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.models import Instance  # noqa: E402
from tests.helpers import toml_document  # noqa: E402

MG = "1.2.840.10008.5.1.4.1.1.1.2"
VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))


def fill(
    db: Database, n_instances: int, batch: int = 5000, days: int = 1096, keep: list | None = None
) -> dict:
    """Rows only (C-FIND reads rows). Returns sample keys to query by. ``keep``: a list the
    rows are appended to as well (to load the same studies into Orthanc)."""
    start = dt.date(2024, 1, 1)
    n_studies = n_instances // 4
    n_patients = max(1, n_studies * 2 // 5)
    rows: list[dict] = []
    sample: dict = {}
    t0 = time.perf_counter()
    for i in range(n_studies):
        p = i % n_patients
        study = f"1.2.826.0.1.3680043.10.7777.{i}"
        day = start + dt.timedelta(days=(i * days) // n_studies)
        for k, (lat, view) in enumerate(VIEWS):
            rows.append(
                dict(
                    sop_instance_uid=f"{study}.{k + 1}.1",
                    sop_class_uid=MG,
                    study_instance_uid=study,
                    series_instance_uid=f"{study}.{k + 1}",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"instances/{study}/{k}.dcm",
                    size_bytes=17_000_000,
                    received_at=dt.datetime.combine(day, dt.time(9)),
                    calling_aet="MODALITY",
                    patient_id=f"PAT{p:07d}",
                    patient_name=f"Name{p}^Given",
                    accession_number=f"ACC{i:08d}",
                    study_date=day.strftime("%Y%m%d"),
                    study_time="093000",
                    modality="MG",
                    series_number=k + 1,
                    instance_number=1,
                    laterality=lat,
                    view=view,
                    role="candidate",
                    for_processing=False,
                    slot=f"{lat}-{view}",
                )
            )
        if i == n_studies // 2:
            sample = {
                "patient_id": f"PAT{p:07d}",
                "study": study,
                "series": f"{study}.1",
                "date": day.strftime("%Y%m%d"),
            }
        if len(rows) >= batch:
            if keep is not None:
                keep.extend(rows)
            with db.write() as s:
                s.execute(insert(Instance), rows)
            rows = []
    if rows:
        if keep is not None:
            keep.extend(rows)
        with db.write() as s:
            s.execute(insert(Instance), rows)
    if db.dialect == "postgresql":
        with db.engine.connect() as c:
            c.exec_driver_sql("ANALYZE")
    sample["fill_seconds"] = time.perf_counter() - t0
    return sample


def _query(level: str, **keys) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in {
        "StudyInstanceUID": "",
        "PatientID": "",
        "PatientName": "",
        "StudyDate": "",
        "AccessionNumber": "",
        "ModalitiesInStudy": "",
    }.items():
        setattr(ds, k, v)
    if level in ("SERIES", "IMAGE"):
        ds.SeriesInstanceUID = ""
        ds.Modality = ""
        del ds.ModalitiesInStudy
    if level == "IMAGE":
        ds.SOPInstanceUID = ""
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def measure(port: int, sample: dict, repeats: int) -> list[tuple[str, float, int]]:
    ae = AE(ae_title="QRSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MAMMO_NODE")
    assert assoc.is_established, "association rejected"
    # As the node does on its side: without it, Nagle's algorithm holds the request's data
    # PDU until the node's delayed ACK (~40 ms) and that is all one would measure.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    d = dt.datetime.strptime(sample["date"], "%Y%m%d").date()
    month = f"{d:%Y%m}01-{d:%Y%m}28"
    week = f"{d:%Y%m%d}-{d + dt.timedelta(days=6):%Y%m%d}"
    queries = [
        ("C-ECHO (reference)", None),
        ("STUDY by PatientID", _query("STUDY", PatientID=sample["patient_id"])),
        ("STUDY by date (1 day)", _query("STUDY", StudyDate=sample["date"])),
        ("STUDY by date range (1 week)", _query("STUDY", StudyDate=week)),
        ("STUDY by date range (4 weeks)", _query("STUDY", StudyDate=month)),
        ("STUDY by PatientName prefix", _query("STUDY", PatientName="Name1234*")),
        ("SERIES of one study", _query("SERIES", StudyInstanceUID=sample["study"])),
        (
            "IMAGE of one series",
            _query("IMAGE", StudyInstanceUID=sample["study"], SeriesInstanceUID=sample["series"]),
        ),
    ]
    out = []
    try:
        for name, q in queries:
            times, n = [], 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                if q is None:
                    assoc.send_c_echo()
                else:
                    n = sum(
                        1
                        for st, ident in assoc.send_c_find(
                            q, StudyRootQueryRetrieveInformationModelFind
                        )
                        if st and st.Status in (0xFF00, 0xFF01)
                    )
                times.append((time.perf_counter() - t0) * 1000)
            out.append((name, statistics.median(times), n))
    finally:
        assoc.release()
    return out


def measure_dcmtk(port: int, sample: dict, repeats: int) -> list[tuple[str, float, int]]:
    """The same study-level queries with DCMTK's findscu (and echoscu as the reference)."""
    d = dt.datetime.strptime(sample["date"], "%Y%m%d").date()
    base = ["-aet", "QRSCU", "-aec", "MAMMO_NODE", "127.0.0.1", str(port)]
    study = [
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        "PatientName",
        "-k",
        "AccessionNumber",
    ]
    cases = [
        ("echoscu (reference)", ["/usr/bin/echoscu", *base]),
        (
            "findscu STUDY by PatientID",
            ["/usr/bin/findscu", *base, *study, "-k", f"PatientID={sample['patient_id']}"],
        ),
        (
            "findscu STUDY by date (1 day)",
            ["/usr/bin/findscu", *base, *study, "-k", f"StudyDate={sample['date']}"],
        ),
        (
            "findscu STUDY by date (1 week)",
            [
                "/usr/bin/findscu",
                *base,
                *study,
                "-k",
                f"StudyDate={d:%Y%m%d}-{d + dt.timedelta(days=6):%Y%m%d}",
            ],
        ),
        (
            "findscu STUDY by date (4 weeks)",
            ["/usr/bin/findscu", *base, *study, "-k", f"StudyDate={d:%Y%m}01-{d:%Y%m}28"],
        ),
    ]
    out = []
    for name, cmd in cases:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append((time.perf_counter() - t0) * 1000)
        out.append((name, statistics.median(times), 0))
    return out


def measure_sql(url: str, sample: dict, repeats: int) -> dict[str, float]:
    """The matching alone (storage.query through node.query), without the DICOM exchange."""
    from node.query import Query, QueryService
    from storage.reports import Reports

    db = Database(url)
    queries = QueryService(Reports(db))
    d = dt.datetime.strptime(sample["date"], "%Y%m%d").date()
    cases = {
        "STUDY by PatientID": ("STUDY", {"PatientID": sample["patient_id"]}),
        "STUDY by date (1 day)": ("STUDY", {"StudyDate": sample["date"]}),
        "STUDY by date range (1 week)": (
            "STUDY",
            {"StudyDate": f"{d:%Y%m%d}-{d + dt.timedelta(days=6):%Y%m%d}"},
        ),
        "STUDY by date range (4 weeks)": ("STUDY", {"StudyDate": f"{d:%Y%m}01-{d:%Y%m}28"}),
    }
    out = {}
    for name, (level, keys) in cases.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            queries.find(Query(level, keys), limit=1000)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = statistics.median(times)
    db.close()
    return out


def run_engine(engine: str, n: int, repeats: int, tmp: Path) -> None:
    server = None
    if engine == "sqlite":
        url = f"sqlite:///{tmp / 'sqlite' / 'mammo-node.db'}"
        (tmp / "sqlite").mkdir()
    else:
        from tests.pg import PostgresServer

        server = PostgresServer().start()
        url = server.new_database("bench")
    try:
        db = Database(url)
        sample = fill(db, n)
        db.close()
        port = free_port()
        data = tmp / f"data-{engine}"
        config = tmp / f"{engine}.toml"
        config.write_text(
            toml_document(
                {
                    "node": {
                        "ae_title": "MAMMO_NODE",
                        "host": "127.0.0.1",
                        "port": port,
                        "data_dir": str(data),
                        "database_url": url,
                        "max_query_results": 1000,
                    },
                    "storage": {"min_free_mb": 0, "purge_above_percent": ""},
                },
                {"peers": [{"ae_title": "QRSCU", "services": ["echo", "find"]}]},
            )
        )
        log = open(tmp / f"{engine}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "node", "start", "--config", str(config), "--role", "listener"],
            cwd=tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_port(port, 60)
            rows = measure(port, sample, repeats)
            dcmtk = measure_dcmtk(port, sample, repeats)
        finally:
            proc.terminate()
            proc.wait(30)
        sql = measure_sql(url, sample, repeats)
        ref = rows[0][1]
        print(
            f"\n{engine}: {n:,} instances (filled in {sample['fill_seconds']:.1f} s), "
            f"median of {repeats}"
        )
        print(f"  {'query':34s} {'ms':>8s} {'x C-ECHO':>9s} {'matches':>8s}")
        for name, ms, matches in rows:
            print(
                f"  {name:34s} {ms:8.1f} {ms / ref:9.1f} {matches:8d}"
                + (f"   (database: {sql[name]:.1f} ms)" if name in sql else "")
            )
        print("  DCMTK findscu (a whole process each time; reference: echoscu the same way)")
        dref = dcmtk[0][1]
        for name, ms, _ in dcmtk:
            print(f"  {name:34s} {ms:8.1f} {ms / dref:9.2f}")
    finally:
        if server is not None:
            server.stop()


ORTHANC = "/usr/sbin/Orthanc"


def _dataset(row: dict):
    """A header-only DICOM file (no pixel data: C-FIND reads headers) of one row."""
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = row["sop_class_uid"], row["sop_instance_uid"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        row["study_instance_uid"],
        row["series_instance_uid"],
    )
    ds.PatientID, ds.PatientName = row["patient_id"], row["patient_name"]
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = (
        row["accession_number"],
        row["study_date"],
        row["study_time"],
    )
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MG", row["series_number"], 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def findscu_ms(port: int, called: str, keys: list[str], repeats: int) -> tuple[float, int]:
    """Median wall time of DCMTK findscu (a process each time) and its number of matches."""
    cmd = [
        "/usr/bin/findscu",
        "-S",
        "-aet",
        "QRSCU",
        "-aec",
        called,
        "127.0.0.1",
        str(port),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        "PatientName",
        "-k",
        "PatientID",
        "-k",
        "AccessionNumber",
        *[x for k in keys for x in ("-k", k)],
    ]
    times, n = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        times.append((time.perf_counter() - t0) * 1000)
        out = r.stdout + r.stderr
        n = out.count("Find Response:") - out.count("(Success)")
    return statistics.median(times), n


def pynetdicom_ms(port: int, called: str, keys: dict, repeats: int) -> tuple[float, int]:
    """Median time of the same query over one pynetdicom association (no process start)."""
    ae = AE(ae_title="QRSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"association with {called} rejected"
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = q.PatientName = q.PatientID = q.AccessionNumber = ""
    for k, v in keys.items():
        setattr(q, k, v)
    times, n = [], 0
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            n = sum(
                1
                for st, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
                if st and st.Status == 0xFF00
            )
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        assoc.release()
    return statistics.median(times), n


def run_orthanc(n: int, repeats: int, rounds: int, tmp: Path) -> None:
    """The same studies in Orthanc and in the node (SQLite), the same queries side by side:
    a one-month StudyDate range and a one-day one, each with DCMTK findscu and pynetdicom."""
    import json
    import urllib.request

    rows: list[dict] = []
    url = f"sqlite:///{tmp / 'orthanc-cmp.db'}"
    db = Database(url)
    # 93 days: a 28-day range holds about 30 % of the studies (~600 of 2,000).
    sample = fill(db, n, days=93, keep=rows)
    db.close()
    http, dicom = free_port(), free_port()
    ofolder = tmp / "orthanc"
    ofolder.mkdir()
    (ofolder / "config.json").write_text(
        json.dumps(
            {
                "Name": "bench",
                "StorageDirectory": str(ofolder / "db"),
                "IndexDirectory": str(ofolder / "db"),
                "HttpPort": http,
                "DicomPort": dicom,
                "DicomAet": "ORTHANC",
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "Plugins": [],
                "DicomCheckCalledAet": False,
                "LimitFindResults": 0,
                "LimitFindInstances": 0,
                "DicomModalities": {"qrscu": ["QRSCU", "127.0.0.1", 1]},
            }
        )
    )
    olog = open(tmp / "orthanc.log", "wb")
    orthanc = subprocess.Popen(
        [ORTHANC, str(ofolder / "config.json")], stdout=olog, stderr=subprocess.STDOUT
    )
    port = free_port()
    config = tmp / "node-cmp.toml"
    config.write_text(
        toml_document(
            {
                "node": {
                    "ae_title": "MAMMO_NODE",
                    "host": "127.0.0.1",
                    "port": port,
                    "data_dir": str(tmp / "data-cmp"),
                    "database_url": url,
                    "max_query_results": 10000,
                },
                "storage": {"min_free_mb": 0, "purge_above_percent": ""},
            },
            {"peers": [{"ae_title": "QRSCU", "services": ["echo", "find"]}]},
        )
    )
    nlog = open(tmp / "node-cmp.log", "wb")
    node = subprocess.Popen(
        [sys.executable, "-m", "node", "start", "--config", str(config), "--role", "listener"],
        cwd=tmp,
        stdout=nlog,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(http, 60)
        t0 = time.perf_counter()
        for r in rows:
            req = urllib.request.Request(
                f"http://127.0.0.1:{http}/instances",
                data=_dataset(r),
                method="POST",
                headers={"Content-Type": "application/dicom"},
            )
            urllib.request.urlopen(req, timeout=60).read()
        print(
            f"{n:,} instances ({n // 4:,} studies over 93 days) in Orthanc in "
            f"{time.perf_counter() - t0:.0f} s and in the node's database"
        )
        wait_port(port, 60)
        wait_port(dicom, 60)
        d = dt.datetime.strptime(sample["date"], "%Y%m%d").date()
        cases = [("one-month range", f"{d:%Y%m}01-{d:%Y%m}28"), ("one-day", sample["date"])]
        results: dict[tuple[str, str, str], list[tuple[float, int]]] = {}
        for _ in range(rounds):
            for name, value in cases:
                for who, p, called in (("node", port, "MAMMO_NODE"), ("Orthanc", dicom, "ORTHANC")):
                    results.setdefault((name, who, "findscu"), []).append(
                        findscu_ms(p, called, [f"StudyDate={value}"], repeats)
                    )
                    results.setdefault((name, who, "pynetdicom"), []).append(
                        pynetdicom_ms(p, called, {"StudyDate": value}, repeats)
                    )
        print(f"  median of {repeats} per round; range over {rounds} rounds (ms)")
        print(
            f"  {'query':18s} {'client':11s} {'matches':>7s} {'node':>15s} "
            f"{'Orthanc':>15s} {'node/Orthanc':>13s}"
        )
        for name, _ in cases:
            for client in ("findscu", "pynetdicom"):
                nd = results[(name, "node", client)]
                ot = results[(name, "Orthanc", client)]
                ratios = [a[0] / b[0] for a, b in zip(nd, ot, strict=True)]
                print(
                    f"  {name:18s} {client:11s} {nd[0][1]:7d} "
                    f"{min(x for x, _ in nd):6.1f}-{max(x for x, _ in nd):6.1f}  "
                    f"{min(x for x, _ in ot):6.1f}-{max(x for x, _ in ot):6.1f}  "
                    f"{min(ratios):5.2f}-{max(ratios):5.2f}"
                    + ("" if nd[0][1] == ot[0][1] else f"  (Orthanc: {ot[0][1]} matches)")
                )
    finally:
        for proc in (node, orthanc):
            proc.terminate()
            proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--engines", default="sqlite,postgresql")
    ap.add_argument(
        "--orthanc",
        action="store_true",
        help="the same studies in Orthanc and the node, queried side by side "
        "(--instances defaults to 8,000 here: Orthanc is filled over HTTP)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="--orthanc: rounds reported as a range")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.orthanc:
            n = args.instances if args.instances != 100_000 else 8_000
            run_orthanc(n, args.repeats, args.rounds, Path(tmp))
            return
        for engine in args.engines.split(","):
            run_engine(engine.strip(), args.instances, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
