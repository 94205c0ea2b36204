"""Audit log: seals (Merkle roots over ranges of packets, chained, with their leaves) and the
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
    sa.Column('packets_total', sa.BigInteger(), nullable=False),
    sa.Column('root', sa.String(length=64), nullable=False),
    sa.Column('previous_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.Column('leaf_seqs', sa.LargeBinary(), nullable=False),
    sa.Column('leaf_ids', sa.Text(), nullable=False),
    sa.Column('leaf_hashes', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('hash'),
    sa.UniqueConstraint('last_seq')
    )
    op.create_table('audit_purges',
    sa.Column('packet_seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('packet_id', sa.String(length=36), nullable=False),
    sa.Column('purged_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('packet_seq')
    )


def downgrade():
    op.drop_table('audit_purges')
    op.drop_table('audit_seals')
