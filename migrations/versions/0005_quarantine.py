"""Quarantine: packets refused for their content, kept for repair and replay.

Revision ID: 0005_quarantine
Revises: 0004_deliveries
Create Date: 2026-12-02 01:57:59.770059

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0005_quarantine'
down_revision = '0004_deliveries'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('quarantine',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('body', sa.JSON(), nullable=False),
    sa.Column('errors', sa.JSON(), nullable=False),
    sa.Column('error_fields', sa.Text(), nullable=False),
    sa.Column('user_id', sa.String(length=256), nullable=True),
    sa.Column('origin', sa.String(length=512), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('size_bytes', sa.Integer(), nullable=False),
    sa.Column('seen_count', sa.Integer(), nullable=False),
    sa.Column('first_seen_at', sa.DateTime(), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('digest')
    )
    with op.batch_alter_table('quarantine', schema=None) as batch_op:
        batch_op.create_index('ix_quarantine_last_seen', ['last_seen_at'], unique=False)
        batch_op.create_index('ix_quarantine_user', ['user_id', 'id'], unique=False)



def downgrade():
    with op.batch_alter_table('quarantine', schema=None) as batch_op:
        batch_op.drop_index('ix_quarantine_user')
        batch_op.drop_index('ix_quarantine_last_seen')

    op.drop_table('quarantine')
