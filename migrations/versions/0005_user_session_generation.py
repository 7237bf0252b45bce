"""user session generation

Each user gets a session generation, copied into the session at sign-in. Logout, a password change
or reset, and disabling the account raise it, which ends every session of that user (copies of the
cookie included): the portal refuses a session whose generation is not the user's current one.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 13:10:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('session_generation', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('session_generation')
