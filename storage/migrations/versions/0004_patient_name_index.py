"""an index on lower(patient_name): case-insensitive PatientName queries use it

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 16:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from storage.models import PATIENT_NAME_INDEX

    sql = PATIENT_NAME_INDEX.get(op.get_context().dialect.name)
    if sql:
        op.execute(sql)


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_instances_patient_name_lower")
