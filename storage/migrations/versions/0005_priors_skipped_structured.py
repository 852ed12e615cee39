"""priors and skipped exams as data: exams.prior_rule / read_on_request / volume_only_json
(they were sentences in the notes), an index on a patient's exams (PatientID + issuer) and
on instances.patient_birth_date (the prior lookup of studies without a PatientID); the new
exam state "skipped" needs no schema change (exams.state is a plain string)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00
"""

from __future__ import annotations

import json
import re

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_VOLUME_ONLY = re.compile(
    r"^([LR]-(?:CC|MLO)): only a tomosynthesis volume; read with this "
    r"view missing"
)


def upgrade() -> None:
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prior_rule", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("read_on_request", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("volume_only_json", sa.Text(), nullable=True))
        batch_op.create_index(
            "ix_exams_patient", ["patient_id", "issuer_of_patient_id"], unique=False
        )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instances_patient_birth_date"), ["patient_birth_date"], unique=False
        )
    # What release 0.2's notes and reasons said, as the new fields.
    conn = op.get_bind()
    exams = sa.table(
        "exams",
        sa.column("id", sa.Integer),
        sa.column("state", sa.String),
        sa.column("reason", sa.Text),
        sa.column("notes_json", sa.Text),
        sa.column("prior_rule", sa.String),
        sa.column("read_on_request", sa.Boolean),
        sa.column("volume_only_json", sa.Text),
    )
    for row in conn.execute(
        sa.select(exams.c.id, exams.c.state, exams.c.reason, exams.c.notes_json)
    ).all():
        try:
            notes = [str(n) for n in json.loads(row.notes_json or "[]")]
        except ValueError:
            notes = []
        reason = row.reason or ""
        rule = None
        if row.state == "prior":
            rule = "age" if "prior_after_days" in reason else "gap"
        slots = sorted({m.group(1) for n in notes if (m := _VOLUME_ONLY.match(n))})
        conn.execute(
            sa.update(exams)
            .where(exams.c.id == row.id)
            .values(
                prior_rule=rule,
                read_on_request=any("read on request" in n for n in notes),
                volume_only_json=json.dumps(slots) if slots else None,
            )
        )


def downgrade() -> None:
    # A release without the state reads a skipped exam as one that failed with the reason.
    op.execute("UPDATE exams SET state = 'failed' WHERE state = 'skipped'")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_patient_birth_date"))
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.drop_index("ix_exams_patient")
        batch_op.drop_column("volume_only_json")
        batch_op.drop_column("read_on_request")
        batch_op.drop_column("prior_rule")
