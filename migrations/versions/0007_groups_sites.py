"""groups (radiology sites)

A group is a radiology site. Each user belongs to at most one group; each study belongs to its
uploader's group (a re-run to its original's). Users see only their group's studies, images,
exports and review cases; admins see every group's. Users and studies without a group form the
default group, so an existing installation behaves as before until an admin creates groups.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 13:30:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('groups',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=80), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_groups')),
    sa.UniqueConstraint('name', name=op.f('uq_groups_name'))
    )
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('group_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_users_group_id'), ['group_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_users_group_id_groups'), 'groups', ['group_id'], ['id'])

    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('group_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_studies_group_id'), ['group_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_studies_group_id_groups'), 'groups', ['group_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_studies_group_id_groups'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_studies_group_id'))
        batch_op.drop_column('group_id')

    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_users_group_id_groups'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_users_group_id'))
        batch_op.drop_column('group_id')

    op.drop_table('groups')
