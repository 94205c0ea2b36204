"""The digests that identify a packet and an Idempotency-Key never change form: a bridge
resends a packet days later, and its copy must hash to the key stored for the original by
whichever release stored it. So the text hashed stays the compact, ASCII-escaped JSON array
it has always been (``json.dumps`` with ``(",", ":")`` separators), whatever builds it; and a
packet id stays a lowercase, hyphenated UUIDv7, time-ordered as it is handed out."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from bucket.services.ingest import EPOCH, identity_key, scoped_idempotency_key
from bucket.timeutil import new_packet_id

# Digests computed by the releases that stored packets until now: non-ASCII text, an astral
# character, quotes, backslashes, control characters, DEL and U+2028 are escaped as
# ``json.dumps`` escapes them; the instant is floored to its millisecond, before 1970 too.
STORED = [
    (
        ("gurukul", "stu_2001", "sess_a1", datetime(2026, 11, 28, 10, 20, tzinfo=UTC), None),
        "f6bdc5ba5869fed41d50c361cfd91b52",
    ),
    (
        (None, "emp_7", "", datetime(2026, 11, 28, 10, 20, 0, 123999, tzinfo=UTC), None),
        "8714ba4031d3030eedb3ac2353df50d0",
    ),
    (
        (
            "ems",
            "Ünïcødé 学生 🎓",
            None,
            datetime(1900, 1, 1, 0, 0, 0, 999, tzinfo=UTC),
            "unverified",
        ),
        "5530905343295b66126415013708caef",
    ),
    (
        (
            "gurukul",
            'q"uo\\te/\n\t\x00\x1f\x7f\u2028',
            "s",
            datetime(1969, 12, 31, 23, 59, 59, 999500, tzinfo=UTC),
            None,
        ),
        "3b60d4842d77f8afd76745111aeda62e",
    ),
]


def reference_digest(*parts) -> str:
    """The digest as first defined: blake2b-128 of ``json.dumps`` of the parts."""
    text = json.dumps(list(parts), separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def test_identity_keys_hash_to_the_digests_stored_before():
    for args, digest in STORED:
        assert identity_key(*args) == digest


def test_idempotency_keys_hash_to_the_digests_stored_before():
    assert scoped_idempotency_key("stu_2001", "key-1") == "cc14e61a6775398e4723f3c583d7c9ed"
    assert (
        scoped_idempotency_key("Ünï 🎓", 'k"\\\n', "unverified")
        == "6632c72a38ffd26274a56138a09640b9"
    )
    assert scoped_idempotency_key("stu_2001", None) is None


moments = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2999, 12, 31), timezones=st.just(UTC)
)


@settings(max_examples=300, deadline=None)
@given(
    system_type=st.none() | st.text(),
    user_id=st.text(),
    session_id=st.none() | st.text(),
    moment=moments,
    scope=st.none() | st.text(),
)
def test_any_identity_hashes_as_its_json_array(system_type, user_id, session_id, moment, scope):
    millis = (moment - EPOCH) // timedelta(milliseconds=1)
    parts = [system_type, user_id, session_id, millis]
    if scope is not None:
        parts.insert(0, scope)
    expected = reference_digest(*parts)
    assert identity_key(system_type, user_id, session_id, moment, scope) == expected


@settings(max_examples=200, deadline=None)
@given(user_id=st.text(), key=st.text(), scope=st.none() | st.text())
def test_any_idempotency_key_hashes_as_its_json_array(user_id, key, scope):
    parts = [user_id, key] if scope is None else [scope, user_id, key]
    assert scoped_idempotency_key(user_id, key, scope) == reference_digest(*parts)


def test_packet_ids_are_lowercase_uuid7_in_the_order_handed_out():
    ids = [new_packet_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for value in ids[:50] + ids[-50:]:
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    now_ms = datetime.now(UTC).timestamp() * 1000
    assert abs((uuid.UUID(ids[-1]).int >> 80) - now_ms) < 60_000
    # The 62 random bits differ from id to id, not only the clock's part.
    assert len({uuid.UUID(value).int & ((1 << 62) - 1) for value in ids}) == len(ids)
