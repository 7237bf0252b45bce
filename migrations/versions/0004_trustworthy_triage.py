"""trustworthy triage: unfamiliar-image reference, flag kinds, fracture probability, audits, timings

Model versions record the sha256 of their "unfamiliar image" reference; predictions record why they
were flagged (unsure / unfamiliar), the unfamiliar score, the probability of a fracture, whether the
image was sent to review as an audit sample, and per-image decode and model seconds; an index
on (model version, created_at) serves the daily drift view and /metrics.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 12:45:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reference_sha256', sa.String(length=64), nullable=True))

    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('flag_kind', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('unfamiliar_score', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('fracture_probability', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('audit', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('decode_seconds', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('model_seconds', sa.Float(), nullable=True))
        batch_op.create_index(batch_op.f('ix_predictions_flag_kind'), ['flag_kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_predictions_fracture_probability'), ['fracture_probability'], unique=False)
        batch_op.create_index(batch_op.f('ix_predictions_audit'), ['audit'], unique=False)
        batch_op.create_index('ix_predictions_model_version_id_created_at', ['model_version_id', 'created_at'], unique=False)
    # predictions made before this revision: their flags were all low-confidence flags
    op.execute("UPDATE predictions SET flag_kind = 'unsure' WHERE flagged")


def downgrade() -> None:
    with op.batch_alter_table('predictions', schema=None) as batch_op:
        batch_op.drop_index('ix_predictions_model_version_id_created_at')
        batch_op.drop_index(batch_op.f('ix_predictions_audit'))
        batch_op.drop_index(batch_op.f('ix_predictions_fracture_probability'))
        batch_op.drop_index(batch_op.f('ix_predictions_flag_kind'))
        for column in ('model_seconds', 'decode_seconds', 'audit', 'fracture_probability', 'unfamiliar_score', 'flag_kind'):
            batch_op.drop_column(column)

    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_column('reference_sha256')
