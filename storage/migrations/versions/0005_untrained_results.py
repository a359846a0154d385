"""A result says whether its model's weights were untrained (a demo's, not age estimates), so
that every export, page and figure of it can say so.

Existing results of the demo's untrained model (its card's name) are marked; others are not:
no other untrained card was ever shipped.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("untrained", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute(
        sa.text("UPDATE results SET untrained = :yes WHERE model_name = :demo").bindparams(
            yes=True, demo="xrayage-untrained-seresnet"
        )
    )
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.alter_column("untrained", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("untrained")
