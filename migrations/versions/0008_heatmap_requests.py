"""heat maps on request

A reviewer can ask for the heat map of any classified image; a worker task computes it. When it
cannot (the model runtime has no torch model to explain, the stored file cannot be decoded), the
reason is kept on the prediction so the viewer stops waiting and says why.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26 15:55:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heatmap_error', sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_column('heatmap_error')
