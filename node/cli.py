"""The ``mammo-node`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from node import __version__
from node.config import Config, ConfigError, check_port, load_config

if TYPE_CHECKING:
    from storage.db import Database
    from storage.exams import Exams
    from storage.reports import Reports

EXIT_NOT_RUNNING = 3  # as LSB "status": program is not running


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", default=None, help="configuration file (default: ./config.toml)"
    )


def _load(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        print(f"mammo-node: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_start(args: argparse.Namespace) -> int:
    from node.daemon import run, setup_logging

    cfg = _load(args)
    if args.device:
        from node.config import check_device

        try:
            cfg.inference.device = check_device(args.device, "--device")
        except ConfigError as exc:
            print(f"mammo-node: {exc}", file=sys.stderr)
            return 2
    if args.metrics_port is not None:
        if args.role == "all":
            print(
                "mammo-node: --metrics-port is for --role listener, worker or exporter (role "
                "all serves /metrics on the DICOMweb port)",
                file=sys.stderr,
            )
            return 2
        try:
            port = check_port(args.metrics_port, "--metrics-port")
        except ConfigError as exc:
            print(f"mammo-node: {exc}", file=sys.stderr)
            return 2
        setattr(cfg.roles, f"{args.role}_metrics_port", port)
    setup_logging(args.log_level or cfg.logging.level, cfg.logging.format)
    return run(cfg, run_worker=not args.no_worker, role=args.role)


def cmd_db(args: argparse.Namespace) -> int:
    """Schema version, migrations, and copying the whole database to another one."""
    from storage import schema
    from storage.db import Database

    cfg = _load(args)
    db = Database(cfg.database_url, check_schema=False)
    try:
        if args.db_command == "current":
            have, want = schema.revision(db.engine), schema.head()
            print(
                f"schema revision {have or '(empty database)'}; this release needs {want}"
                + ("" if have in (want, None) else ": run 'mammo-node db upgrade'")
            )
            return 0 if have in (want, None) else 1
        if args.db_command == "upgrade":
            before, after = schema.upgrade(db.write_engine)
            print(
                f"schema at revision {after}"
                + (
                    " (new database)"
                    if before is None
                    else " (already current)"
                    if before == after
                    else f" (upgraded from {before})"
                )
            )
            return 0
        if args.db_command == "copy":
            from storage.copy import CopyError, copy_database

            try:
                counts = copy_database(db, args.to, progress=not args.quiet)
            except CopyError as exc:
                print(f"mammo-node db copy: {exc}", file=sys.stderr)
                return 1
            print("copied " + ", ".join(f"{n} {t}" for t, n in counts.items()))
            print(
                f"now set [node] database_url to the new database ({args.to.split('@')[-1]})"
                " and start the node"
            )
            return 0
    finally:
        db.close()
    return 2


def _open_db(cfg: Config) -> Database | None:
    """The node's database; None when it is a SQLite file not created yet."""
    from storage.db import Database

    if cfg.database_url.startswith("sqlite:///"):
        db_file = cfg.database_url[len("sqlite:///") :]
        from pathlib import Path

        if not Path(db_file).exists():
            return None
    return Database(cfg.database_url)


def _open_reports(cfg: Config) -> Reports | None:
    from storage.reports import Reports

    db = _open_db(cfg)
    return Reports(db) if db is not None else None


def _open_exams(cfg: Config) -> Exams | None:
    from storage.exams import Exams

    db = _open_db(cfg)
    return (
        Exams(
            db,
            prior_after_days=cfg.grouping.prior_after_days,
            prior_gap_days=cfg.grouping.prior_gap_days,
        )
        if db is not None
        else None
    )


def exams_json(reports: Reports | None) -> list[dict]:
    """What ``mammo-node exams --json`` prints: every exam with its delivery counts."""
    from storage.reports import DeliveryCounts, ExamView

    exams = [ExamView.of(e).to_json() for e in reports.list_exams()] if reports else []
    delivery = reports.delivery_summary() if reports else {}
    for e in exams:
        e["delivery"] = delivery.get(e["study_instance_uid"], DeliveryCounts()).to_json()
    return exams


def cmd_exams(args: argparse.Namespace) -> int:
    cfg = _load(args)
    exams = exams_json(_open_reports(cfg))
    if args.state:
        exams = [e for e in exams if e["state"] == args.state]
    if args.json:
        print(json.dumps(exams, indent=2))
        return 0
    if not exams:
        print("no exams")
        return 0
    from storage.models import SLOTS

    header = [
        "STUDY INSTANCE UID",
        "ACCESSION",
        "STATE",
        "VER",
        *SLOTS,
        "DELIVERY",
        "MISSING / REASON",
    ]
    rows = []
    for e in exams:
        why = ", ".join(e["missing"]) if e["missing"] else ""
        if e["reason"]:
            why = f"{why} | {e['reason']}" if why else e["reason"]
        rows.append(
            [
                e["study_instance_uid"],
                e["accession_number"] or "",
                e["state"],
                str(e["version"]),
                *("yes" if e["views"][s] else "-" for s in SLOTS),
                " ".join(
                    f"{d}:" + ",".join(f"{n} {st}" for st, n in sorted(c.items()))
                    for d, c in e["delivery"].items()
                )
                or "-",
                why,
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _operator() -> dict[str, str]:
    """Who ran a CLI action, for the audit trail (the account, not a patient)."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:
        user = "?"
    return {"user": user, "host": socket.gethostname(), "via": "cli"}


def _audit(cfg: Config, name: str, ok: bool = True, **fields: Any) -> None:
    """One audit record of an operator's CLI action, in the node's own audit trail (and its
    syslog collector)."""
    import os

    from node import audit as A

    os.umask(0o077)  # as the daemon: the trail and its folder for the service account only
    log = A.AuditLog(
        cfg.audit_path, cfg.node.ae_title, cfg.audit.syslog, fail_closed=cfg.audit.fail_closed
    )
    try:
        log.event(name, A.SUCCESS if ok else A.MINOR_FAILURE, peer=_operator(), **fields)
    finally:
        log.close()


def cmd_resend(args: argparse.Namespace) -> int:
    from node import audit as A

    cfg = _load(args)
    from storage.deliveries import Deliveries

    db = _open_db(cfg)
    n = Deliveries(db).requeue_study(args.study_uid) if db is not None else 0
    _audit(cfg, A.APPLICATION_ACTIVITY, n > 0, action="resend", study=args.study_uid, deliveries=n)
    if n == 0:
        print(f"mammo-node: no results to resend for study {args.study_uid}", file=sys.stderr)
        return 1
    print(f"queued {n} delivery(ies) of study {args.study_uid} again")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from node.daemon import read_pidfile

    cfg = _load(args)
    info = read_pidfile(cfg)
    echo = None
    if info:
        echo = _echo(cfg, info)
    reports = _open_reports(cfg)
    counts = reports.counts_by_state().to_json() if reports else {}
    instances = reports.instance_count() if reports else 0
    out = {
        "running": info is not None,
        "pid": info.get("pid") if info else None,
        "ae_title": cfg.node.ae_title,
        "port": info.get("port") if info else cfg.node.port,
        "echo": echo,
        "data_dir": str(cfg.data_dir),
        "exams": counts,
        "instances": instances,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        if info:
            print(
                f"mammo-node is running: pid {info['pid']}, {cfg.node.ae_title} on port "
                f"{info.get('port')}, C-ECHO {'ok' if echo else 'FAILED'}"
            )
        else:
            print("mammo-node is not running")
        print(f"data: {cfg.data_dir} ({instances} instance(s))")
        print("exams: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
    return 0 if info else EXIT_NOT_RUNNING


def _echo(cfg: Config, info: dict) -> bool:
    from node.scu import AssociationFailed, echo

    host = cfg.node.host if cfg.node.host not in ("0.0.0.0", "", "::") else "127.0.0.1"
    # With [[peers]], echo as a peer granted it from this host (or any host).
    calling = "MAMMO_STATUS"
    for p in cfg.peers:
        if "echo" in p.services and p.matches(p.ae_title, host):
            calling = p.ae_title
            break
    tls = None
    if cfg.node.tls:
        import ssl

        from node.security import client_context

        ctx = client_context(cfg)
        ctx.check_hostname = False  # our own listener, by address
        if not cfg.tls.ca_certificates:
            ctx.verify_mode = ssl.CERT_NONE
        tls = (ctx, None)
    try:
        return echo(
            calling, host, int(info.get("port") or cfg.node.port), cfg.node.ae_title, 5, tls
        )
    except AssociationFailed:
        return False


def _exam_action(args: argparse.Namespace, action: str) -> int:
    """``reprocess``, ``complete`` and ``resolve``: one exam, one transition, one line."""
    from node.assembly import assign_policy
    from storage.transitions import ExamNotFound

    cfg = _load(args)
    store = _open_exams(cfg)
    if store is None:
        print(f"mammo-node: no database in {cfg.data_dir}", file=sys.stderr)
        return 1
    study = args.study_uid
    from node import audit as A

    what = A.PATIENT_RECORD if action == "resolve" else A.APPLICATION_ACTIVITY
    try:
        if action == "reprocess":
            version, state = store.reprocess(study)
            print(f"study {study}: version {version} is {state} (read again)")
        elif action == "complete":
            missing, state = store.complete_now(study)
            print(
                f"study {study} is {state}"
                + (f" with {', '.join(missing)} missing" if missing else "")
            )
        else:
            detached, state, version = store.resolve_patient(
                study,
                args.patient_id,
                assign_policy(cfg),
                issuer=args.issuer,
                patient_name=args.patient_name,
            )
            print(
                f"study {study}: {detached} instance(s) of other patients left the exam; "
                f"version {version} is {state}"
            )
    except ExamNotFound:
        _audit(cfg, what, False, action=action, study=study, reason="no such exam")
        print(f"mammo-node: no exam for study {study}", file=sys.stderr)
        return 1
    except ValueError as exc:
        _audit(cfg, what, False, action=action, study=study, reason=str(exc))
        print(f"mammo-node: {study}: {exc}", file=sys.stderr)
        return 1
    _audit(cfg, what, action=action, study=study, state=state)
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from storage.files import FileStore
    from storage.retention import Retention

    cfg = _load(args)
    db = _open_db(cfg)
    if db is None:
        print(f"mammo-node: no database in {cfg.data_dir}", file=sys.stderr)
        return 1
    keep = args.older_than if args.older_than is not None else cfg.retention.keep_images_days
    if args.study and keep is None:
        keep = 0.0  # a named study goes now, if it may go at all
    ret = Retention(db, FileStore(cfg.data_dir, fsync=False))
    report = ret.run(
        keep,
        cfg.retention.keep_results_days if not args.study else None,
        None,
        study=args.study,
        dry_run=args.dry_run,
    )
    if not args.dry_run:
        from node import audit as A

        if report.studies:
            _audit(
                cfg,
                A.STUDY_DELETED,
                action="purge",
                studies=report.studies,
                instances=report.instances,
                results=report.results or None,
            )
        elif args.study:
            _audit(
                cfg,
                A.STUDY_DELETED,
                False,
                action="purge",
                studies=[args.study],
                reason=report.kept.get(args.study, "not purgeable"),
            )
    verb = "would purge" if args.dry_run else "purged"
    print(
        f"{verb} {len(report.studies)} study(ies): {report.instances} image(s), "
        f"{report.bytes / 1e6:.1f} MB"
        + (f"; {report.results} result object(s)" if report.results else "")
    )
    for study in report.studies:
        print(f"  {study}")
    for study, why in sorted(report.kept.items()):
        if args.study is None or study == args.study:
            print(f"  kept {study}: {why}")
    if args.study and args.study not in report.studies:
        why = report.kept.get(args.study, "not read yet, or already purged, or unknown")
        print(f"mammo-node: study {args.study} is not purged: {why}", file=sys.stderr)
        return 1
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    import datetime as dt

    from node.audit import read_events

    cfg = _load(args)
    since = None
    if args.since:
        try:
            since = dt.datetime.fromisoformat(args.since.replace("Z", "+00:00"))
        except ValueError:
            print(
                f"mammo-node: --since {args.since!r} is not an ISO 8601 date/time", file=sys.stderr
            )
            return 2
        if since.tzinfo is None:
            since = since.replace(tzinfo=dt.UTC)
    from node import audit as A

    n = 0
    for rec in read_events(cfg.audit_path, since=since, study=args.study, event=args.event):
        n += 1
        if args.json:
            print(json.dumps(rec, separators=(",", ":")))
            continue
        peer = rec.get("peer") or rec.get("to") or {}
        who = (
            peer
            if isinstance(peer, str)
            else " ".join(
                str(peer.get(k)) for k in ("ae_title", "name", "token", "address") if peer.get(k)
            )
        )
        detail = {
            k: v
            for k, v in rec.items()
            if k not in ("time", "event", "outcome", "node", "peer", "to")
        }
        outcome = {0: "ok", 4: "FAILED", 8: "FAILED (serious)"}.get(
            int(rec.get("outcome") or 0), "?"
        )
        print(
            f"{rec.get('time', '')}  {rec.get('event', ''):<36} {outcome:<7} {who:<30} "
            + json.dumps(detail, separators=(",", ":"))
        )
    # Reading the trail is itself audited (PS3.15 A.5.3.2 Audit Log Used), after the read
    # (streamed, never held whole) so that the reader's own line is not part of what it reads.
    _audit(
        cfg,
        A.AUDIT_LOG_USED,
        action="read",
        since=args.since,
        study=args.study,
        event_filter=args.event,
        records=n,
    )
    if n == 0 and not args.json:
        print(
            f"no audit events in {cfg.audit_path}"
            + (" matching" if (since or args.study or args.event) else ""),
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from storage.transitions import ExamState

    parser = argparse.ArgumentParser(
        prog="mammo-node", description="DICOM-native AI node for screening mammography."
    )
    parser.add_argument("--version", action="version", version=f"mammo-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("start", help="run the node in the foreground (Ctrl-C / SIGTERM stops)")
    _add_config(p)
    p.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: [logging] level",
    )
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="receive and group only: no inference, no export (a receive-only node)",
    )
    p.add_argument(
        "--role",
        default="all",
        choices=["all", "listener", "worker", "exporter"],
        help="what this process runs (default all). listener: DICOM + DICOMweb "
        "listeners and the grouping timer; worker: reads exams (one at a "
        "time, claimed in the database); exporter: sends results. Several "
        "processes share one database (PostgreSQL across hosts) and data_dir",
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="the worker's device: cpu, cuda, cuda:N (default [inference] device)",
    )
    p.add_argument(
        "--metrics-port",
        default=None,
        type=int,
        metavar="PORT",
        help="this role process's /healthz, /readyz and /metrics port (default "
        "[roles] <role>_metrics_port)",
    )
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("db", help="database schema: current, upgrade; copy to another database")
    _add_config(p)
    dsub = p.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    q = dsub.add_parser("current", help="the schema revision and the one this release needs")
    _add_config(q)
    q = dsub.add_parser("upgrade", help="migrate the schema to this release's (back up first)")
    _add_config(q)
    q = dsub.add_parser(
        "copy",
        help="copy every row to another, empty database (e.g. SQLite "
        "to PostgreSQL); stop the node first",
    )
    _add_config(q)
    q.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="target SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("resend", help="queue a study's results for every destination again")
    _add_config(p)
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("exams", help="list exams: state, views received, what is missing")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="JSON array instead of a table")
    p.add_argument("--state", choices=[s.value for s in ExamState], help="only exams in this state")
    p.set_defaults(func=cmd_exams)

    p = sub.add_parser(
        "reprocess",
        help="read an exam again, as a new version (its results replace the earlier ones)",
    )
    _add_config(p)
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.set_defaults(func=lambda a: _exam_action(a, "reprocess"))

    p = sub.add_parser(
        "complete", help="process a partial exam now instead of waiting [grouping] stable_seconds"
    )
    _add_config(p)
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.set_defaults(func=lambda a: _exam_action(a, "complete"))

    p = sub.add_parser(
        "resolve",
        help="end a patient conflict: keep one patient's images in the exam and read it again",
    )
    _add_config(p)
    p.add_argument("study_uid", metavar="STUDY_UID")
    p.add_argument(
        "--patient-id",
        required=True,
        metavar="ID",
        help="the Patient ID whose images the exam keeps (the others stay stored, "
        "outside the exam)",
    )
    p.add_argument(
        "--issuer",
        metavar="ISSUER",
        default=None,
        help="Issuer of Patient ID, where two issuers use the same IDs",
    )
    p.add_argument(
        "--patient-name",
        metavar="NAME",
        default=None,
        help="the patient's name as in the images (Family^Given), where the "
        "images carry no Patient ID (give --patient-id '')",
    )
    p.set_defaults(func=lambda a: _exam_action(a, "resolve"))

    p = sub.add_parser(
        "purge",
        help="delete received images (and old results) that "
        "retention allows: exams done and delivered",
    )
    _add_config(p)
    p.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    p.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        default=None,
        help="instead of [retention] keep_images_days",
    )
    p.add_argument("--study", metavar="UID", help="only this study (if it may go)")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser(
        "audit",
        help="print the audit trail (associations, queries, "
        "retrieves, stores, exports, security alerts)",
    )
    _add_config(p)
    p.add_argument(
        "--since",
        metavar="ISO",
        help="only events at or after this time (e.g. 2026-11-29T08:00:00Z)",
    )
    p.add_argument("--study", metavar="UID", help="only events that concern this study")
    p.add_argument("--event", metavar="NAME", help='only this event, e.g. "Security Alert"')
    p.add_argument("--json", action="store_true", help="JSON lines as stored")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("status", help="is a node running; exams by state")
    _add_config(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    from inference.cli import register as register_inference

    register_inference(sub, _add_config, _load)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from storage.schema import SchemaOutdated

    try:
        return int(args.func(args) or 0)
    except SchemaOutdated as exc:
        print(f"mammo-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
