"""The standalone verifier's decoding, on bytes built here (no server): the edge values a
sealed packet can hold, and the JSON leaf format of the seals made before the binary one."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime

import pytest

from tests.test_audit import load_verifier

verifier = load_verifier()


def record(*fields: tuple[int, bytes | None]) -> bytes:
    """A binary record as PostgreSQL's record_send writes it: count, then OID, length, value."""
    out = struct.pack(">i", len(fields))
    for oid, value in fields:
        out += struct.pack(">Ii", oid, -1 if value is None else len(value)) + (value or b"")
    return out


def test_a_record_decodes_empty_text_negative_numbers_and_times_before_2000():
    """An empty string is not NULL; int8 and timestamps are signed (micros before 2000-01-01)."""
    before = -1_000_000  # one second before the PostgreSQL epoch
    content = record(
        (25, b""),
        (25, None),
        (25, "é".encode()),
        (20, struct.pack(">q", -5)),
        (701, struct.pack(">d", 1.5)),
        (1114, struct.pack(">q", before)),
    )
    assert verifier.decode_record(content) == [
        "",
        None,
        "é",
        -5,
        1.5,
        datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (record((23, struct.pack(">i", 1))), "^field of unknown type 23$"),
        (record((25, b"x")) + b"\x00", "^bytes left over after the last field$"),
    ],
)
def test_a_record_that_is_not_one_is_refused_saying_why(content, message):
    with pytest.raises(ValueError, match=message):
        verifier.decode_record(content)


def leaf_json(**changes) -> dict:
    stated = dict.fromkeys(verifier.LEAF_FIELDS)
    stated.update(packet_id="p1", seq=1, received_at="2026-11-28T10:00:00.000001+00:00")
    return {**stated, **changes}


def test_the_json_leaf_format_reads_times_and_keeps_nulls():
    """Leaf format 1: sorted JSON; timestamps become datetimes, a null one stays null."""
    stated = verifier.fields_of(json.dumps(leaf_json(), sort_keys=True).encode(), 1)
    assert stated["received_at"] == datetime(2026, 11, 28, 10, 0, 0, 1, tzinfo=UTC)
    assert stated["client_timestamp"] is None
    assert stated["packet_id"] == "p1" and set(stated) == set(verifier.LEAF_FIELDS)


@pytest.mark.parametrize(
    "body",
    [
        json.dumps([1, 2]),
        json.dumps({k: v for k, v in leaf_json().items() if k != "role"}),
        json.dumps({**leaf_json(), "extra": 1}),
    ],
)
def test_json_that_is_not_a_packets_fields_is_refused(body):
    with pytest.raises(ValueError, match="^not the fields of a packet$"):
        verifier.fields_of(body.encode(), 1)


def test_a_binary_record_with_the_wrong_number_of_fields_is_refused():
    with pytest.raises(ValueError, match=f"^1 fields, not {len(verifier.LEAF_FIELDS)}$"):
        verifier.fields_of(record((25, b"x")))


def test_json_fields_compare_by_content_not_by_key_order():
    """raw_signals shown with its keys in another order is the same value; 1 is not true."""
    sealed = {"b": 1, "a": [True, None]}
    assert verifier.same("raw_signals", sealed, {"a": [True, None], "b": 1})
    assert not verifier.same("raw_signals", sealed, {"a": [1, None], "b": 1})
    assert not verifier.same("raw_signals", None, {})
    assert verifier.same("raw_signals", None, None)
