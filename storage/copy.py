"""``mammo-node db copy --to URL``: every row of the node's database into another, empty
database (an existing SQLite node moving to PostgreSQL), in one transaction on the target."""

from __future__ import annotations

from sqlalchemy import func, select, text

from storage.db import Database
from storage.models import Base

BATCH = 2000


class CopyError(RuntimeError):
    """The copy cannot be made (nothing was written to the target)."""


def copy_database(src: Database, to_url: str, progress: bool = True) -> dict[str, int]:
    """Copy every table, parents before children; table -> rows copied. The source must be at
    this release's schema (``db upgrade`` first) and the target empty (it is created at the
    same schema)."""
    from tqdm import tqdm

    from storage.schema import SchemaOutdated, head, revision

    if revision(src.engine) != head():
        raise CopyError(
            f"the source database is at schema {revision(src.engine)}, not "
            f"{head()}: run 'mammo-node db upgrade' first"
        )
    try:
        dst = Database(to_url)
    except SchemaOutdated as exc:
        raise CopyError(f"the target database: {exc}") from None
    except Exception as exc:
        raise CopyError(f"cannot open the target database: {type(exc).__name__}: {exc}") from None
    tables = Base.metadata.sorted_tables
    counts: dict[str, int] = {}
    try:
        with dst.engine.connect() as c:
            full = [
                t.name for t in tables if c.execute(select(func.count()).select_from(t)).scalar()
            ]
        if full:
            raise CopyError(
                f"the target database is not empty ({', '.join(full)}): copy "
                f"only into a new database"
            )
        with src.engine.connect() as sc, dst.write_engine.begin() as dc:
            for table in tables:
                total = sc.execute(select(func.count()).select_from(table)).scalar() or 0
                order = list(table.primary_key.columns)
                rows = sc.execution_options(stream_results=True).execute(
                    select(table).order_by(*order)
                )
                with tqdm(total=total, desc=table.name, unit=" rows", disable=not progress) as bar:
                    for batch in rows.partitions(BATCH):
                        dc.execute(table.insert(), [dict(r._mapping) for r in batch])
                        bar.update(len(batch))
                counts[table.name] = total
            if dst.dialect == "postgresql":
                # Rows kept their ids: move each id sequence past them.
                for table in tables:
                    if "id" in table.c and table.c.id.autoincrement in (True, "auto"):
                        dc.execute(
                            text(
                                f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                                f"COALESCE((SELECT MAX(id) FROM {table.name}), 1), "
                                f"(SELECT MAX(id) FROM {table.name}) IS NOT NULL)"
                            )
                        )
    finally:
        dst.close()
    return counts
