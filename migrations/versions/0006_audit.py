"""Audit log: seals (Merkle roots over ranges of packets, chained), their leaves, and the
packets retention purged.

Revision ID: 0006_audit
Revises: 0005_quarantine
Create Date: 2026-12-02 17:00:00.000000

"""
from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = '0006_audit'
down_revision = '0005_quarantine'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('audit_seals',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('sealed_at', sa.DateTime(), nullable=False),
    sa.Column('after_seq', sa.BigInteger(), nullable=False),
    sa.Column('last_seq', sa.BigInteger(), nullable=False),
    sa.Column('packet_count', sa.Integer(), nullable=False),
    sa.Column('root', sa.String(length=64), nullable=False),
    sa.Column('previous_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('hash')
    )
    op.create_table('audit_leaves',
    sa.Column('packet_seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('packet_id', sa.String(length=36), nullable=False),
    sa.Column('seal_seq', sa.BigInteger(), nullable=False),
    sa.Column('leaf_index', sa.Integer(), nullable=False),
    sa.Column('leaf_hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('packet_seq')
    )
    with op.batch_alter_table('audit_leaves', schema=None) as batch_op:
        batch_op.create_index('ix_audit_leaves_seal', ['seal_seq', 'leaf_index'], unique=False)
    op.create_table('audit_purges',
    sa.Column('packet_seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('packet_id', sa.String(length=36), nullable=False),
    sa.Column('purged_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('packet_seq')
    )


def downgrade():
    op.drop_table('audit_purges')
    with op.batch_alter_table('audit_leaves', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_leaves_seal')
    op.drop_table('audit_leaves')
    op.drop_table('audit_seals')
