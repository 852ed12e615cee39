"""exams.exam_score (indexed): the dashboard's triage sorts every exam in the database

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 19:30:00
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("exam_score", sa.Float(), nullable=True))
        batch_op.create_index(batch_op.f("ix_exams_exam_score"), ["exam_score"], unique=False)
    # Readings from before: their score, from the reading's plain data (portable: parsed here,
    # not with a dialect's JSON functions).
    exams = sa.table(
        "exams",
        sa.column("id", sa.Integer),
        sa.column("reading_json", sa.Text),
        sa.column("exam_score", sa.Float),
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(exams.c.id, exams.c.reading_json).where(exams.c.reading_json.is_not(None))
    ).all()
    for exam_id, text in rows:
        try:
            score = json.loads(text).get("score")
        except (ValueError, AttributeError):
            continue
        if isinstance(score, (int, float)):
            bind.execute(
                exams.update().where(exams.c.id == exam_id).values(exam_score=float(score))
            )


def downgrade() -> None:
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_exams_exam_score"))
        batch_op.drop_column("exam_score")
