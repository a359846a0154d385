"""A job names the model that is to analyse its image; a delivery names what it carries.

Existing jobs take the model of the instance's newest result where there is one (a job left
queued names none: the next model to claim it takes it); existing deliveries are the SC where
their object is a result's SC, else the SR.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_sha256", sa.String(length=64), nullable=True))
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="sr")
        )
    op.execute(
        "UPDATE jobs SET model_sha256 = (SELECT r.model_sha256 FROM results r "
        "WHERE r.instance_id = jobs.instance_id ORDER BY r.id DESC LIMIT 1) "
        "WHERE state <> 'queued'"
    )
    op.execute(
        "UPDATE deliveries SET kind = 'sc' WHERE sop_instance_uid IN "
        "(SELECT sc_sop_instance_uid FROM results WHERE sc_sop_instance_uid IS NOT NULL)"
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.alter_column("kind", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("kind")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("model_sha256")
