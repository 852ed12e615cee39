"""image kinds, implants, priors: instances.image_kind / implant, exams.study_date /
kinds_json / implant (the exam state "prior" needs no schema change)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_kind", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("implant", sa.Boolean(), nullable=True))
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_date", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("kinds_json", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("implant", sa.Boolean(), nullable=True))
    # Rows from before: 2-D mammography instances were conventional or For Processing.
    op.execute(
        "UPDATE instances SET image_kind = CASE WHEN for_processing THEN "
        "'for_processing' ELSE 'conventional' END WHERE role IN "
        "('candidate', 'extra', 'unclassified')"
    )
    op.execute(
        "UPDATE exams SET study_date = (SELECT MIN(i.study_date) FROM instances i "
        "WHERE i.exam_id = exams.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("exams", schema=None) as batch_op:
        batch_op.drop_column("implant")
        batch_op.drop_column("kinds_json")
        batch_op.drop_column("study_date")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("implant")
        batch_op.drop_column("image_kind")
