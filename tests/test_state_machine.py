"""Property-based test: random interleavings of delivery operations never break the guarantees.

A Hypothesis ``RuleBasedStateMachine`` drives ingest, duplicate ingest, poll, ack, nack, stale
ack, lease expiry and queue loss through the HTTP API and checks the database against a model
after every step: nothing acknowledged is lost, nothing is served again after a successful ack,
and every status count equals the model's.

Time is driven by moving ``visible_at`` into the past for the rows concerned
(``tests.queue_helpers.expire``), not by sleeping; ``BUCKET_RETRY_BACKOFF=0`` makes a nacked
packet visible again at once, so no step needs the clock to advance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select, text

from bucket.extensions import db, queue
from bucket.models import Delivery
from tests.factories import make_packet
from tests.queue_helpers import API, ack, expire, poll, status

MAX_ATTEMPTS = 3


@dataclass
class Model:
    """What the queue should hold for one packet."""

    body: dict
    state: str = "pending"
    count: int = 0
    receipt: str | None = None
    expired: bool = False
    old_receipts: list[str] = field(default_factory=list)

    @property
    def suspect(self) -> bool:
        return self.state == "leased" and self.expired and self.count < MAX_ATTEMPTS


def reset(app) -> None:
    """Empty the tables (packets and their counters) and the queue between examples."""
    with app.app_context():
        db.session.execute(text("DELETE FROM deliveries"))
        db.session.execute(text("DELETE FROM packets"))
        db.session.execute(text("DELETE FROM packet_counters"))
        db.session.commit()
        queue.flush()


def make_machine(app):
    """The state machine class bound to one application."""

    class DeliveryMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            reset(app)
            self.client = app.test_client()
            self.model: dict[str, Model] = {}

        def ids(self, *states: str) -> list[str]:
            return sorted(pid for pid, m in self.model.items() if m.state in states)

        def leased_ids(self) -> list[str]:
            return self.ids("leased")

        def stale_ids(self) -> list[str]:
            return sorted(pid for pid, m in self.model.items() if m.old_receipts)

        @rule()
        def ingest(self) -> None:
            body = make_packet(user_id="machine")
            response = self.client.post(f"{API}/ingest", json=body)
            assert response.status_code == 200
            assert not response.json.get("duplicate")
            self.model[response.json["packet_id"]] = Model(body)

        @precondition(lambda self: self.model)
        @rule(data=st.data())
        def ingest_duplicate(self, data) -> None:
            packet_id = data.draw(st.sampled_from(sorted(self.model)))
            body = dict(self.model[packet_id].body, retry_count=1)
            response = self.client.post(f"{API}/ingest", json=body)
            assert response.status_code == 200
            assert response.json["packet_id"] == packet_id
            assert response.json.get("duplicate") is True

        @rule(limit=st.integers(1, 4))
        def poll(self, limit: int) -> None:
            for m in self.model.values():  # the claim first reaps exhausted expired leases
                if m.state == "leased" and m.expired and m.count >= MAX_ATTEMPTS:
                    m.state, m.receipt = "dead", None
            healthy = set(self.ids("pending"))
            suspects = {pid for pid, m in self.model.items() if m.suspect}
            body = poll(self.client, limit=limit, visibility_timeout=600)
            served = {p["packet_id"]: p for p in body["packets"]}
            if not healthy and not suspects:
                assert not served
                return
            assert served, "visible packets exist but the poll came back empty"
            if any(p["suspect"] for p in served.values()):
                assert len(served) == 1 and set(served) <= suspects
            else:
                assert set(served) <= healthy
                assert len(served) == min(limit, len(healthy))
            for pid, packet in served.items():
                m = self.model[pid]
                assert packet["delivery_count"] == m.count + 1
                if m.receipt:
                    m.old_receipts.append(m.receipt)
                m.state, m.count, m.expired = "leased", m.count + 1, False
                m.receipt = packet["receipt"]

        def settle(self, m: Model, success: bool, attempts: int) -> str:
            if success:
                m.state = "processed"
            elif attempts >= MAX_ATTEMPTS:
                m.state = "dead"
            else:
                m.state = "pending"
            m.count, m.receipt, m.expired = attempts, None, False
            return m.state

        @precondition(lambda self: self.ids("leased"))
        @rule(data=st.data(), success=st.booleans(), with_receipt=st.booleans())
        def ack_lease(self, data, success: bool, with_receipt: bool) -> None:
            packet_id = data.draw(st.sampled_from(self.leased_ids()))
            m = self.model[packet_id]
            extra = {"receipt": m.receipt} if with_receipt else {}
            response = ack(self.client, packet_id, success=success, **extra)
            assert response.status_code == 200, response.json
            expected = self.settle(m, success, m.count)
            assert response.json["outcome"] == {"pending": "retry_scheduled"}.get(
                expected, expected
            )

        @precondition(lambda self: self.ids("pending"))
        @rule(data=st.data(), success=st.booleans())
        def ack_unleased(self, data, success: bool) -> None:
            packet_id = data.draw(st.sampled_from(self.ids("pending")))
            m = self.model[packet_id]
            response = ack(self.client, packet_id, success=success)
            assert response.status_code == 200, response.json
            self.settle(m, success, m.count + 1)

        @precondition(lambda self: self.stale_ids())
        @rule(data=st.data(), success=st.booleans())
        def ack_stale(self, data, success: bool) -> None:
            packet_id = data.draw(st.sampled_from(self.stale_ids()))
            m = self.model[packet_id]
            receipt = data.draw(st.sampled_from(m.old_receipts))
            response = ack(self.client, packet_id, success=success, receipt=receipt)
            if m.state == "processed":
                assert response.status_code == 200
                assert response.json["outcome"] == "already_processed"
            else:
                assert response.status_code == 409

        @precondition(lambda self: self.ids("processed"))
        @rule(data=st.data())
        def ack_processed_again(self, data) -> None:
            packet_id = data.draw(st.sampled_from(self.ids("processed")))
            response = ack(self.client, packet_id, success=False)
            assert response.status_code == 200
            assert response.json["outcome"] == "already_processed"

        @precondition(
            lambda self: any(not m.expired for m in self.model.values() if m.state == "leased")
        )
        @rule(data=st.data())
        def expire_lease(self, data) -> None:
            live = [pid for pid in self.leased_ids() if not self.model[pid].expired]
            packet_id = data.draw(st.sampled_from(live))
            expire(app, [packet_id])
            self.model[packet_id].expired = True

        @rule()
        def lose_queue(self) -> None:
            with app.app_context():
                queue.flush()

        @invariant()
        def database_matches_model(self) -> None:
            table = Delivery.__table__
            with app.app_context():
                stored = {
                    r.packet_id: (r.delivery_state, r.delivery_count)
                    for r in db.session.execute(
                        select(table.c.packet_id, table.c.delivery_state, table.c.delivery_count)
                    )
                }
                db.session.commit()
            assert stored == {pid: (m.state, m.count) for pid, m in self.model.items()}

        @invariant()
        def status_counts_match_model(self) -> None:
            figures = status(self.client)
            states = [m.state for m in self.model.values()]
            assert figures["total_packets"] == len(self.model)
            assert figures["processed_packets"] == states.count("processed")
            assert figures["dead_packets"] == states.count("dead")
            assert figures["pending_packets"] == states.count("pending") + states.count("leased")
            assert figures["leased_packets"] == states.count("leased")
            ready = states.count("pending") + sum(m.suspect for m in self.model.values())
            assert figures["queue_size"] == ready

    return DeliveryMachine


def test_delivery_state_machine_matches_the_model(make_app):
    """No interleaving of the operations loses, double-serves or miscounts a packet."""
    app = make_app(BUCKET_MAX_ATTEMPTS=MAX_ATTEMPTS, BUCKET_RETRY_BACKOFF=0)
    run_state_machine_as_test(
        make_machine(app),
        # The same runs on both backends, every time: enough of them that a stale receipt
        # accepted, a nack miscounted or a suspect batched is found on SQLite and PostgreSQL.
        settings=settings(
            max_examples=60,
            stateful_step_count=30,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
