"""PostgreSQL: a packet's low-cardinality strings as one-byte codes, employee_id NULL when it
repeats user_id.

``system_type``, ``role``, ``cognitive_state``, ``state`` and ``auth_outcome`` take a handful of
values, each 8-11 bytes of every row as text. Since this revision a value of the fixed code
table below (the same as ``bucket.models.PACKET_CODES``) is stored as its ``"char"`` code in
``<name>_code`` (one byte) with the text column NULL; any other value stays as text, exactly
as received, code NULL. An EMS packet's ``employee_id`` equal to its ``user_id`` is stored NULL
with ``employee_is_user`` true (NULL otherwise), which also takes it out of the partial
``ix_packets_employee`` (the user listing finds it by ``user_id``). Readers and the audit leaf
decode them to the same text (``bucket/services/codes.py``): seals keep verifying.

Existing rows are converted by one UPDATE (every partition; a rewrite of the rows holding
any known value: on a large table run it in a quiet hour, and VACUUM afterwards so the old
row versions' space is reused). Downgrade writes the text back and drops the six columns.

A process of the version before reads the text columns only: stop those before this runs
(their polls would serve a coded packet's strings as NULL; README, "Deploying"). Their
sealer would seal them so, leaves that verify then reports as altered: migration 0023 makes
the database refuse the seals of a release before it.

SQLite keeps every value as text: its six columns are added and stay NULL.

Revision ID: 0022_packet_codes
Revises: 0021_lean_processed_deliveries
Create Date: 2026-12-07 01:30:00.000000

"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.types import UserDefinedType


# revision identifiers, used by Alembic.
revision = '0022_packet_codes'
down_revision = '0021_lean_processed_deliveries'
branch_labels = None
depends_on = None

STATES = {
    "DEEP_FOCUS": "D",
    "ON_TASK": "O",
    "THINKING": "T",
    "IDLE": "I",
    "DISTRACTED": "X",
    "AWAY": "A",
    "OFF_TASK": "F",
    "WORKING": "W",
    "FAKING": "K",
}
CODES = {
    "system_type": {"gurukul": "g", "ems": "e"},
    "role": {"student": "s", "employee": "e"},
    "cognitive_state": STATES,
    "state": STATES,
    "auth_outcome": {"verified": "v", "missing": "m", "invalid": "i", "mismatch": "x"},
}


class InternalChar(UserDefinedType):
    cache_ok = True

    def get_col_spec(self, **kw):
        return '"char"'


def _known(name):
    return ", ".join(f"'{value}'" for value in CODES[name])


def _encode(name):
    arms = " ".join(f"WHEN '{value}' THEN '{code}'::\"char\"" for value, code in CODES[name].items())
    return (
        f"{name}_code = CASE {name} {arms} END, "
        f"{name} = CASE WHEN {name} IN ({_known(name)}) THEN NULL ELSE {name} END"
    )


def _decode(name):
    arms = " ".join(f"WHEN '{code}' THEN '{value}'" for value, code in CODES[name].items())
    return f"{name} = coalesce({name}, CASE {name}_code {arms} END)"


def upgrade():
    postgres = op.get_bind().dialect.name == "postgresql"
    code = InternalChar() if postgres else sa.String()
    for name in CODES:
        op.add_column('packets', sa.Column(f'{name}_code', code, nullable=True))
    op.add_column('packets', sa.Column('employee_is_user', sa.Boolean(), nullable=True))
    if not postgres:
        return
    op.execute(
        "UPDATE packets SET "
        + ", ".join(_encode(name) for name in CODES)
        + ", employee_is_user = CASE WHEN employee_id = user_id THEN true END, "
        "employee_id = CASE WHEN employee_id = user_id THEN NULL ELSE employee_id END "
        "WHERE "
        + " OR ".join(f"{name} IN ({_known(name)})" for name in CODES)
        + " OR employee_id = user_id"
    )


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "UPDATE packets SET "
            + ", ".join(_decode(name) for name in CODES)
            + ", employee_id = coalesce(employee_id, CASE WHEN employee_is_user THEN user_id END) "
            "WHERE "
            + " OR ".join(f"{name}_code IS NOT NULL" for name in CODES)
            + " OR employee_is_user"
        )
    with op.batch_alter_table('packets') as batch_op:
        batch_op.drop_column('employee_is_user')
        for name in reversed(list(CODES)):
            batch_op.drop_column(f'{name}_code')
