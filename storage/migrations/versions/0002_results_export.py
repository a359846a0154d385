"""What a results export needs: the instance's sex, study date, device and view, read at
receipt; the result's age gaps (as the SR carries them) and the time it was reported.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.tables import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("patient_sex", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("study_date", sa.Date(), nullable=True))
        batch_op.add_column(sa.Column("manufacturer", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("manufacturer_model_name", sa.String(length=64), nullable=True)
        )
        batch_op.add_column(sa.Column("view_position", sa.String(length=16), nullable=True))
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("age_gap", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("corrected_age_gap", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("reported_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        for column in ("reported_at", "corrected_age_gap", "age_gap"):
            batch_op.drop_column(column)
    with op.batch_alter_table("instances", schema=None) as batch_op:
        for column in (
            "view_position",
            "manufacturer_model_name",
            "manufacturer",
            "study_date",
            "patient_sex",
        ):
            batch_op.drop_column(column)
