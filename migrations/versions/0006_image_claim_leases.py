"""image claim leases: the worker holding an image and until when

A worker claims a chunk's images under a lease (``claimed_by``: host, process id and a per-process
nonce; ``lease_expires_at``) that it renews while it works. Workers re-queue images whose lease ran
out, or whose claiming process on the same host is gone, instead of waiting a fixed time. An index
on (status, updated_at) serves that watchdog.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 13:20:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index('ix_images_status_updated_at', ['status', 'updated_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_status_updated_at')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('claimed_by')
