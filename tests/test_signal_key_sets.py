"""raw_signals stored compact on PostgreSQL (migration 0020): a key set of a dictionary and the
values. Every reader gets back exactly the JSON it got before, the audit leaf is the same bytes
in either form, the dictionary is bounded and takes each set once, and ingest pays a statement
only for a set new to its process. SQLite stores every packet in full, as before.
"""

from __future__ import annotations

import uuid

import orjson
import pytest
from sqlalchemy import select, text

from bucket.extensions import db
from bucket.jsonutil import canonical_json
from bucket.models import Packet
from bucket.schemas.packets import fast_load_packet
from bucket.services.audit.content import LEAF_FROM, LEAF_SELECT, LEAF_SQL, leaf_content
from bucket.services.coalescing import Submission
from bucket.services.ingest import write_submissions
from bucket.services.signals import MAX_SIGNAL_KEYS
from tests.concurrency import run_threads
from tests.factories import make_packet
from tests.queue_helpers import listing, poll
from tests.statements import captured_statements

API = "/api/v1/bucket/prana"
# Keys out of order, values of every kind: nested objects (sorted inside too), a string holding
# the separator, quotes, a comma and a format() directive, floats, null, -0.0.
SIGNALS = {
    "tab_visible": True,
    "dwell_time_ms": 48210,
    "scroll_depth": 0.62,
    "note": 'é \x1f "q", %s %I',
    "nested": {"b": [1, {"z": None, "a": 1.5}], "a": "x"},
    "none": None,
    "v:1.x-y_z": -0.0,
}
CANONICAL = canonical_json(SIGNALS)


def stored(app) -> dict[str, tuple]:
    """Each packet's stored form: (raw_signals as text, signal_keys, signal_values)."""
    with app.app_context():
        rows = db.session.execute(
            text(
                "SELECT CAST(packet_id AS TEXT), CAST(raw_signals AS TEXT), signal_keys, "
                "signal_values FROM packets"
            )
        ).all()
        db.session.commit()
    return {row[0]: tuple(row[1:]) for row in rows}


def as_text(signals) -> str:
    """A parsed answer's signals as JSON text in the order they came (no sorting)."""
    return orjson.dumps(signals).decode()


def post(client, body, status=200):
    response = client.post(f"{API}/ingest", json=body)
    assert response.status_code == status, response.json
    return response.json


def test_single_batch_and_shared_writes_store_compact_and_readers_see_the_same_json(
    app, client, backend
):
    """A single packet, a batch and a write shared by two requests (the coalesced write) are
    stored as key set and values on PostgreSQL, in full on SQLite; the poll, the listing, the
    artifact and the model give back exactly the signals sent, in canonical order."""
    ids = [post(client, make_packet(raw_signals=SIGNALS))["packet_id"]]
    batch = post(client, {"packets": [make_packet(raw_signals=SIGNALS) for _ in range(2)]})
    ids += [result["packet_id"] for result in batch["results"]]
    with app.app_context():
        load = [fast_load_packet(make_packet(raw_signals=SIGNALS)) for _ in range(3)]
        shared = write_submissions([Submission(load[:1], "k-1"), Submission(load[1:])])
    ids += [outcome.packet_id for outcomes in shared for outcome in outcomes]
    forms = stored(app)
    assert set(forms) == set(ids)
    if backend == "postgres":
        assert {form[0] for form in forms.values()} == {None}
        assert len({form[1] for form in forms.values()}) == 1
        assert None not in {form[1] for form in forms.values()}
        assert {form[2] for form in forms.values()} == {
            "\x1f".join(canonical_json(SIGNALS[key]) for key in sorted(SIGNALS))
        }
    else:
        assert set(forms.values()) == {(CANONICAL, None, None)}
    polled = poll(client, limit=10)["packets"]
    assert sorted(p["packet_id"] for p in polled) == sorted(ids)
    assert {as_text(p["raw_signals"]) for p in polled} == {CANONICAL}
    listed = listing(client, "stu_test", limit=10)
    assert {as_text(p["raw_signals"]) for p in listed} == {CANONICAL}
    assert len(listed) == len(ids)
    artifact = client.get(f"/api/v1/audit/artifact/{ids[0]}").json
    assert as_text(artifact["data"]["raw_signals"]) == CANONICAL
    with app.app_context():
        model = db.session.get(Packet, ids[0])
        assert as_text(model.raw_signals) == CANONICAL
        db.session.commit()


@pytest.mark.parametrize(
    "signals",
    [
        {"has space": 1},
        {"ключ": 1},
        {"k" * 65: 1},
        {"100%": 1},
        {f"k{n:02}": n for n in range(MAX_SIGNAL_KEYS + 1)},
        {},
    ],
    ids=["space", "non-ascii", "long", "percent", "too-many", "empty"],
)
def test_key_sets_the_dictionary_does_not_take_are_stored_in_full(app, client, signals):
    """Keys that are not plain names, more than MAX_SIGNAL_KEYS of them, or none: the packet is
    stored in full as before, and read back the same."""
    packet_id = post(client, make_packet(raw_signals=signals))["packet_id"]
    assert stored(app)[packet_id] == (canonical_json(signals), None, None)
    (polled,) = poll(client)["packets"]
    assert as_text(polled["raw_signals"]) == canonical_json(signals)


def leaves(app, packet_id: str) -> tuple[bytes, bytes]:
    """The packet's leaf as PostgreSQL's sealer computes it and as verify computes it."""
    with app.app_context():
        in_sql = db.session.execute(
            text(f"SELECT {LEAF_SQL} FROM {LEAF_FROM} WHERE packet_id = :p"), {"p": packet_id}
        ).scalar_one()
        row = (
            db.session.execute(select(*LEAF_SELECT).where(Packet.packet_id == packet_id))
            .mappings()
            .one()
        )
        db.session.commit()
    return bytes(in_sql), leaf_content(row)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_compact_row_and_the_same_packet_stored_in_full_have_the_same_leaf(app, client):
    """The leaf covers raw_signals' canonical text whichever way it is stored: rewriting a
    compact row into the full form changes none of its leaf's bytes, in SQL or in Python."""
    packet_id = post(client, make_packet(raw_signals=SIGNALS))["packet_id"]
    assert stored(app)[packet_id][0] is None
    compact = leaves(app, packet_id)
    with app.app_context():
        db.session.execute(
            text(
                "UPDATE packets SET raw_signals = CAST(:raw AS json), signal_keys = NULL, "
                "signal_values = NULL WHERE packet_id = :p"
            ),
            {"raw": CANONICAL, "p": packet_id},
        )
        db.session.commit()
    assert stored(app)[packet_id] == (CANONICAL, None, None)
    assert leaves(app, packet_id) == compact
    assert compact[0] == compact[1]


def test_verify_passes_over_old_and_compact_rows_and_names_an_altered_value(app, client, backend):
    """Seals over packets stored in full (odd keys, and on PostgreSQL one rewritten as the
    rows stored before migration 0020 are) and compact ones verify, their artifacts match;
    changing one value of a compact row makes verify name that packet."""
    compact = [post(client, make_packet(raw_signals=SIGNALS))["packet_id"] for _ in range(3)]
    full = post(client, make_packet(raw_signals={"odd key": [1, 2]}))["packet_id"]
    if backend == "postgres":
        with app.app_context():
            db.session.execute(
                text(
                    "UPDATE packets SET raw_signals = CAST(:raw AS json), signal_keys = NULL, "
                    "signal_values = NULL WHERE packet_id = :p"
                ),
                {"raw": CANONICAL, "p": compact[0]},
            )
            db.session.commit()
    runner = app.test_cli_runner()
    assert runner.invoke(args=["bucket", "seal"]).exit_code == 0
    result = runner.invoke(args=["bucket", "verify"])
    assert result.exit_code == 0, result.output
    for packet_id in [*compact, full]:
        answer = client.get(f"/api/v1/audit/artifact/{packet_id}").json
        assert answer["provenance"]["matches_stored_content"] is True, packet_id
    column = "signal_values" if backend == "postgres" else "raw_signals"
    value = "48211" if backend == "postgres" else CANONICAL.replace("48210", "48211")
    with app.app_context():
        current = db.session.execute(
            text(f"SELECT CAST({column} AS TEXT) FROM packets WHERE packet_id = :p"),
            {"p": compact[1]},
        ).scalar_one()
        altered = current.replace("48210", value) if backend == "postgres" else value
        assert altered != current
        db.session.execute(
            text(f"UPDATE packets SET {column} = :v WHERE packet_id = :p"),
            {"v": altered, "p": compact[1]},
        )
        db.session.commit()
    result = runner.invoke(args=["bucket", "verify"])
    assert result.exit_code == 1
    assert f"altered: seal 1 packet {compact[1]}" in result.output
    assert compact[2] not in result.output


def fresh_signals(count: int = 2) -> dict:
    """Signals whose key set nobody stored yet."""
    tag = uuid.uuid4().hex[:12]
    return {f"s{n}_{tag}": n for n in range(count)}


def key_set_rows(app, keys) -> list[int]:
    with app.app_context():
        found = db.session.execute(
            text("SELECT id FROM signal_key_sets WHERE keys = CAST(:k AS text[])"),
            {"k": sorted(keys)},
        ).scalars()
        ids = list(found)
        db.session.commit()
    return ids


def dictionary_size(app) -> int:
    with app.app_context():
        size = db.session.execute(text("SELECT count(*) FROM signal_key_sets")).scalar_one()
        db.session.commit()
    return size


def naming_dictionary(statements: list[str]) -> list[str]:
    """The statements that ask the dictionary (the write itself checks its sets exist, in the
    same statement: not one more)."""
    return [
        statement
        for statement in statements
        if "signal_key_sets" in statement and "INSERT INTO packets" not in statement
    ]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_a_known_key_set_costs_ingest_no_statement_and_new_ones_one(app, client):
    """The first packet of a set new to the process asks the dictionary once; the next ones
    of that set ask nothing; a batch of three new sets asks once for them all."""
    signals = fresh_signals()
    with captured_statements(app) as statements:
        post(client, make_packet(raw_signals=signals))
    assert len(naming_dictionary(statements)) == 1
    with captured_statements(app) as statements:
        post(client, make_packet(raw_signals=signals))
        post(client, {"packets": [make_packet(raw_signals=signals) for _ in range(3)]})
    assert naming_dictionary(statements) == []
    batch = [make_packet(raw_signals=fresh_signals()) for _ in range(3)]
    with captured_statements(app) as statements:
        post(client, {"packets": batch})
    assert len(naming_dictionary(statements)) == 1
    assert {form[0] for form in stored(app).values()} == {None}
    for packet in batch:
        assert len(key_set_rows(app, packet["raw_signals"])) == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_the_dictionary_stops_at_its_cap_and_packets_beyond_it_are_stored_in_full(make_app):
    """At BUCKET_SIGNAL_KEY_SETS_MAX sets a new set is not added: its packets are stored in
    full, and the process stops asking for a while (a flood of random sets costs no
    statement each); the sets it holds are still used."""
    probe = make_app()
    app = make_app(BUCKET_SIGNAL_KEY_SETS_MAX=dictionary_size(probe) + 1)
    client = app.test_client()
    first, second, third = fresh_signals(), fresh_signals(), fresh_signals()
    kept = post(client, make_packet(raw_signals=first))["packet_id"]
    size = dictionary_size(app)
    refused = post(client, make_packet(raw_signals=second))["packet_id"]
    assert dictionary_size(app) == size
    with captured_statements(app) as statements:
        flood = post(client, make_packet(raw_signals=third))["packet_id"]
        again = post(client, make_packet(raw_signals=first))["packet_id"]
    assert naming_dictionary(statements) == []
    forms = stored(app)
    assert forms[refused] == (canonical_json(second), None, None)
    assert forms[flood] == (canonical_json(third), None, None)
    assert forms[kept][0] is None and forms[again][0] is None
    assert forms[kept][1] == forms[again][1] == key_set_rows(app, first)[0]
    assert key_set_rows(app, second) == [] and key_set_rows(app, third) == []


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_workers_racing_on_a_new_key_set_end_with_one_entry(make_app):
    """Four processes' worth of caches (four apps) post packets of one new set at once, over
    several rounds: each set is in the dictionary once, and every packet names it."""
    apps = [make_app() for _ in range(4)]
    for _ in range(5):
        signals = fresh_signals(3)

        def send(index: int, signals=signals) -> str:
            return post(apps[index].test_client(), make_packet(raw_signals=signals))["packet_id"]

        ids = run_threads(len(apps), send)
        (key_id,) = key_set_rows(apps[0], signals)
        forms = stored(apps[0])
        assert {forms[packet_id][:2] for packet_id in ids} == {(None, key_id)}


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest.mark.parametrize("shape", ["single", "batch", "shared"])
def test_a_key_set_gone_behind_the_workers_cache_loses_no_packet(app, client, shape):
    """The dictionary loses a set this process has cached (restored from a backup, emptied by
    hand): the next packets of that set are stored anyway, their signals readable and intact
    (in full, or compact under the set added again), never pointing at a set that is not there;
    and the process stops trusting the ids it cached."""
    post(client, make_packet(raw_signals=SIGNALS))
    with app.app_context():
        # (the packet above is left pointing at nothing: what a restore does, not ingest)
        db.session.execute(text("DELETE FROM signal_key_sets"))
        db.session.commit()
    if shape == "single":
        ids = [post(client, make_packet(raw_signals=SIGNALS))["packet_id"]]
    elif shape == "batch":
        body = {"packets": [make_packet(raw_signals=SIGNALS) for _ in range(2)]}
        ids = [result["packet_id"] for result in post(client, body)["results"]]
    else:
        with app.app_context():
            load = [fast_load_packet(make_packet(raw_signals=SIGNALS)) for _ in range(2)]
            shared = write_submissions([Submission(load[:1]), Submission(load[1:])])
        ids = [outcome.packet_id for outcomes in shared for outcome in outcomes]
    with app.app_context():
        dangling = db.session.execute(
            text(
                "SELECT count(*) FROM packets p WHERE p.signal_keys IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM signal_key_sets s WHERE s.id = p.signal_keys) "
                "AND CAST(p.packet_id AS TEXT) = ANY(:ids)"
            ),
            {"ids": ids},
        ).scalar_one()
        db.session.commit()
    assert dangling == 0
    out = handed_out(client)
    assert [out.get(packet_id) for packet_id in ids] == [CANONICAL] * len(ids)
    # The set is learned again: the next packet of it is stored compact, under a set that exists.
    packet_id = post(client, make_packet(raw_signals=SIGNALS))["packet_id"]
    raw, keys, _ = stored(app)[packet_id]
    assert raw is None and keys is not None
    assert handed_out(client) == {packet_id: CANONICAL}


def handed_out(client) -> dict[str, str]:
    """The packets the pending poll hands out, each one's raw_signals as canonical text."""
    return {
        packet["packet_id"]: canonical_json(packet["raw_signals"])
        for packet in poll(client, limit=100)["packets"]
    }
