"""The fast packet check agrees with PacketSchema on every packet it answers for.

``fast_load_packet`` may decline any packet (PacketSchema then judges it), but a packet it
accepts must be one PacketSchema accepts, loaded to exactly the same values. Hypothesis mutates
valid packets field by field (wrong types, bounds, NUL characters, missing fields, windows that
do not add up) and compares the two on each.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from bucket.schemas import (
    AckBatchSchema,
    AckSchema,
    PacketSchema,
    fast_load_ack,
    fast_load_acks,
    fast_load_packet,
)
from tests.factories import fixture, make_packet

schema = PacketSchema()
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.text(min_size=255, max_size=258),
    st.just("a\x00b"),
    st.just(""),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(
        ["ON_TASK", "WORKING", "gurukul", "ems", "student", "employee", "2026-11-28T10:00:00Z"]
    ),
)
FIELDS = [
    "user_id",
    "employee_id",
    "session_id",
    "lesson_id",
    "task_id",
    "system_type",
    "role",
    "timestamp",
    "cognitive_state",
    "state",
    "active_seconds",
    "idle_seconds",
    "away_seconds",
    "focus_score",
    "integrity_score",
    "raw_signals",
    "unknown_field",
]


def marshmallow_answer(packet):
    try:
        return schema.load(packet)
    except ValidationError:
        return None


def same(a, b) -> bool:
    """Equal, with NaN-free floats compared exactly."""
    if a.keys() != b.keys():
        return False
    return all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isclose(a[k], b[k], rel_tol=0)) for k in a
    )


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(
    base=st.sampled_from(["made", "gurukul", "ems"]),
    changes=st.dictionaries(st.sampled_from(FIELDS), ODD_VALUES, max_size=4),
    removed=st.sets(st.sampled_from(FIELDS), max_size=3),
)
def test_fast_check_accepts_only_what_the_schema_accepts_with_the_same_values(
    base, changes, removed
):
    packet = {
        "made": make_packet(),
        "gurukul": fixture("gurukul_packet.json"),
        "ems": fixture("ems_packet.json"),
    }[base]
    packet = {k: v for k, v in {**packet, **changes}.items() if k not in removed}
    fast = fast_load_packet(packet)
    if fast is not None:
        slow = marshmallow_answer(packet)
        assert slow is not None, packet
        assert same(fast, slow), (fast, slow)


def test_the_fast_check_answers_for_the_bridges_packets():
    """The packets real clients send take the fast path (or it would save nothing)."""
    for packet in (make_packet(), fixture("gurukul_packet.json"), fixture("ems_packet.json")):
        assert fast_load_packet(packet) == schema.load(packet)


ack_schema = AckSchema()
ACK_FIELDS = ["packet_id", "success", "karma_actions", "error_message", "receipt", "other"]
ACK_VALUES = st.one_of(
    ODD_VALUES,
    st.lists(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), max_size=3),
    st.lists(st.one_of(st.integers(), st.text(max_size=2)), min_size=1, max_size=2),
    st.text(min_size=63, max_size=66),
    st.sampled_from(["true", "1", 1, 0, "yes"]),
)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(
    changes=st.dictionaries(st.sampled_from(ACK_FIELDS), ACK_VALUES, max_size=4),
    removed=st.sets(st.sampled_from(ACK_FIELDS), max_size=2),
)
def test_fast_ack_check_accepts_only_what_the_schema_accepts(changes, removed):
    result = {"packet_id": "0193-abc", "success": True, "karma_actions": [{"a": 1}], **changes}
    result = {k: v for k, v in result.items() if k not in removed}
    fast = fast_load_ack(result)
    if fast is not None:
        try:
            slow = ack_schema.load(result)
        except ValidationError as exc:
            raise AssertionError(f"fast accepted {result}: {exc.messages}") from exc
        assert fast == slow


def test_a_batch_takes_the_fast_path_only_when_every_result_does():
    good = {"packet_id": "p1", "success": False, "error_message": "karma down"}
    assert (
        fast_load_acks({"results": [good, good]})
        == AckBatchSchema().load({"results": [good, good]})["results"]
    )
    assert fast_load_acks({"results": [good, {"packet_id": "p2"}]}) is None
    assert fast_load_acks({"results": []}) is None
    assert fast_load_acks({"results": [good] * 501}) is None
