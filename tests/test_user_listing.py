"""A user's packets: newest first, limit, filters, cursor paging via Link, EMS employee ids."""

from __future__ import annotations

import base64
import json
import re

import pytest

from tests.contract import USER_FIELDS
from tests.factories import fixture, make_packet
from tests.queue_helpers import ingest_many as ingest

API = "/api/v1/bucket/prana"
NEXT_LINK = re.compile(r'<([^>]+)>;\s*rel="next"')


def listing(client, user_id: str, query: str = ""):
    response = client.get(f"{API}/packets/user/{user_id}?{query}")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def ids_of(response) -> list[str]:
    return [p["packet_id"] for p in response.json]


def next_url(response) -> str | None:
    match = NEXT_LINK.search(response.headers.get("Link", ""))
    return match.group(1) if match else None


def test_listing_is_a_list_newest_first_with_the_contract_fields(client):
    """The body stays a JSON list, newest packet first, each with the documented fields."""
    ids = ingest(client, 4, user_id="stu_a")
    response = listing(client, "stu_a")
    assert isinstance(response.json, list)
    assert ids_of(response) == ids[::-1]
    for packet in response.json:
        assert USER_FIELDS <= set(packet)
        assert packet["user_id"] == "stu_a"
    assert "Link" not in response.headers


def test_listing_shows_only_that_users_packets(client):
    """Other users' packets are not listed."""
    mine = ingest(client, 2, user_id="stu_me")
    ingest(client, 3, user_id="stu_other")
    assert sorted(ids_of(listing(client, "stu_me"))) == sorted(mine)
    assert listing(client, "nobody").json == []


def test_limit_bounds_the_page(client):
    """limit caps how many packets one page holds (default 50)."""
    ids = ingest(client, 55, user_id="stu_many")
    assert ids_of(listing(client, "stu_many", "limit=3")) == ids[::-1][:3]
    assert len(listing(client, "stu_many").json) == 50


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=501", "limit=x", "status=bogus", "processed_only=perhaps"]
)
def test_bad_query_parameters_are_422(client, query):
    """Out-of-range or malformed parameters are a 422 naming the parameter."""
    response = client.get(f"{API}/packets/user/stu?{query}")
    assert response.status_code == 422
    name = query.split("=")[0]
    assert name in response.json["errors"]["query"]


def test_unprocessed_and_processed_packets_are_both_listed_by_default(client):
    """Unlike the original, the default listing shows processed packets too."""
    ids = ingest(client, 3, user_id="stu_mix")
    client.post(
        f"{API}/packets/mark-processed",
        json={"packet_id": ids[0], "success": True, "karma_actions": [{"a": 1}]},
    )
    listed = {p["packet_id"]: p for p in listing(client, "stu_mix").json}
    assert set(listed) == set(ids)
    assert listed[ids[0]]["processed_by_karma"] is True
    assert listed[ids[0]]["karma_actions"] == [{"a": 1}]
    assert listed[ids[0]]["processed_at"] is not None
    assert listed[ids[1]]["processed_by_karma"] is False
    assert listed[ids[1]]["processed_at"] is None


def test_processed_only_and_status_filters(client):
    """processed_only keeps processed packets; status selects one delivery state."""
    ids = ingest(client, 4, user_id="stu_f")
    client.get(f"{API}/packets/pending?limit=2")  # leases ids[0], ids[1]
    client.post(f"{API}/packets/mark-processed", json={"packet_id": ids[0], "success": True})
    assert ids_of(listing(client, "stu_f", "processed_only=true")) == [ids[0]]
    assert ids_of(listing(client, "stu_f", "status=processed")) == [ids[0]]
    assert ids_of(listing(client, "stu_f", "status=leased")) == [ids[1]]
    assert ids_of(listing(client, "stu_f", "status=pending")) == [ids[3], ids[2]]
    assert ids_of(listing(client, "stu_f", "status=dead")) == []
    assert listing(client, "stu_f", "processed_only=false").json[0]["packet_id"] == ids[3]
    states = {p["packet_id"]: p["delivery_state"] for p in listing(client, "stu_f").json}
    assert states == {ids[0]: "processed", ids[1]: "leased", ids[2]: "pending", ids[3]: "pending"}


def walk(client, first_url: str) -> tuple[list[str], int]:
    """Follow Link rel=next from ``first_url`` to the end; return every id and the page count."""
    seen, pages, url = [], 0, first_url
    while url:
        response = client.get(url)
        assert response.status_code == 200
        seen.extend(ids_of(response))
        pages += 1
        assert pages < 100, "paging does not end"
        url = next_url(response)
    return seen, pages


def test_cursor_paging_walks_every_packet_once_in_order(client):
    """Following the Link header visits every packet once, newest first, no gaps."""
    singles = ingest(client, 7, user_id="stu_pages")
    batch = client.post(
        f"{API}/ingest",
        json={"packets": [make_packet(user_id="stu_pages") for _ in range(9)]},
    ).json
    batch_ids = [r["packet_id"] for r in batch["results"]]
    more = ingest(client, 5, user_id="stu_pages")
    ingest(client, 4, user_id="someone_else")

    seen, pages = walk(client, f"{API}/packets/user/stu_pages?limit=4")
    assert len(seen) == len(set(seen)) == 21
    assert set(seen) == set(singles + batch_ids + more)
    assert pages == 6
    assert seen[:5] == more[::-1]
    assert seen[-7:] == singles[::-1]
    assert seen == ids_of(listing(client, "stu_pages", "limit=100"))


def test_link_keeps_the_filters_of_the_first_page(client):
    """The next page's URL carries limit and filters, only the cursor changes."""
    ids = ingest(client, 5, user_id="stu_link")
    for packet_id in ids:
        client.post(f"{API}/packets/mark-processed", json={"packet_id": packet_id, "success": True})
    ingest(client, 2, user_id="stu_link")
    first = listing(client, "stu_link", "limit=2&processed_only=true")
    url = next_url(first)
    assert url is not None and "limit=2" in url and "processed_only=true" in url
    seen, pages = walk(client, f"{API}/packets/user/stu_link?limit=2&processed_only=true")
    assert seen == ids[::-1]
    assert pages == 3


def test_ems_packets_are_found_under_their_employee_id(client):
    """An EMS packet is listed under its employee id, also when user_id was sent separately."""
    ems_id = client.post(f"{API}/ingest", json=fixture("ems_packet.json")).json["packet_id"]
    both = client.post(
        f"{API}/ingest", json=make_packet(user_id="portal_77", employee_id="emp_0387")
    ).json["packet_id"]
    listed = listing(client, "emp_0387").json
    assert {p["packet_id"] for p in listed} == {ems_id, both}
    ems = next(p for p in listed if p["packet_id"] == ems_id)
    assert ems["cognitive_state"] == "WORKING"
    assert ids_of(listing(client, "portal_77")) == [both]


def test_employee_paging_has_no_duplicates(client):
    """Paging over a user found by user_id and by employee_id visits each packet once."""
    own = ingest(client, 3, user_id="emp_9")
    via_employee = ingest(client, 3, user_id="desk_9", employee_id="emp_9")
    also_both = ingest(client, 2, user_id="emp_9", employee_id="emp_9")
    seen, _ = walk(client, f"{API}/packets/user/emp_9?limit=2")
    assert len(seen) == len(set(seen)) == 8
    assert set(seen) == set(own + via_employee + also_both)


@pytest.mark.parametrize(
    "cursor",
    [
        "not-a-cursor",
        "%%%",
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'{"a": 1, "b": 2}').decode(),
        base64.urlsafe_b64encode(json.dumps(["2026-11-28T10:00:00", "x"]).encode()).decode(),
        base64.urlsafe_b64encode(json.dumps(["0001-01-01T00:00:00+01:00", "x"]).encode()).decode(),
        base64.urlsafe_b64encode(
            json.dumps(["2026-11-28T10:00:00+00:00", "x\0"]).encode()
        ).decode(),
        # Well formed but for the id: no packet id the service hands out (uuid on PostgreSQL).
        base64.urlsafe_b64encode(
            json.dumps(["2026-11-28T10:00:00+00:00", "not-a-packet-id"]).encode()
        ).decode(),
    ],
    ids=["text", "percent", "numbers", "object", "naive", "overflow", "nul", "not-an-id"],
)
def test_bad_cursor_is_422(client, cursor):
    """A cursor this service did not issue is refused with 422 naming cursor."""
    ingest(client, 1, user_id="stu_c")
    response = client.get(f"{API}/packets/user/stu_c", query_string={"cursor": cursor})
    assert response.status_code == 422
    assert response.json["code"] == 422
    assert "cursor" in response.json["errors"]["query"]


def test_user_id_with_unusual_characters_is_listed(client):
    """Ids with spaces, punctuation and unicode round-trip through the URL path."""
    for user_id in ("stu with space", "stü_ünïcode", "a+b@c.d"):
        (packet_id,) = ingest(client, 1, user_id=user_id)
        response = client.get(f"{API}/packets/user/{user_id}")
        assert response.status_code == 200
        assert ids_of(response) == [packet_id]


def test_nul_in_the_user_id_path_is_an_empty_list(client):
    """A user id no packet can have answers an empty list, never a 500."""
    assert listing(client, "a%00b").json == []


def test_user_ids_with_a_slash_are_listed(client):
    """Any 1–256 character id is a valid user: a slash (sent encoded) does not break the route."""
    stored = ingest(client, 2, user_id="team/a")
    response = client.get(f"{API}/packets/user/team%2Fa")
    assert response.status_code == 200
    assert sorted(ids_of(response)) == sorted(stored)


def test_packets_received_in_the_same_microsecond_page_in_packet_id_order(app, client):
    """The user indexes stop at received_at (migration 0013): packets received in one
    microsecond, by user_id and by employee_id, are still paged once each, newest first and
    then by packet_id descending, with no gap at a page boundary inside the tie."""
    from datetime import UTC, datetime

    from sqlalchemy import update

    from bucket.extensions import db
    from bucket.models import Delivery, Packet

    own = ingest(client, 4, user_id="emp_tie")
    via_employee = ingest(client, 3, user_id="desk_tie", employee_id="emp_tie")
    older = ingest(client, 2, user_id="emp_tie")
    tied = own + via_employee
    with app.app_context():
        for ids, moment in (
            (tied, datetime(2030, 1, 1, 0, 0, 0, 1, tzinfo=UTC)),
            (older, datetime(2020, 1, 1, tzinfo=UTC)),
        ):
            # The delivery keeps a copy of received_at, which the listing joins on (processed
            # deliveries are partitioned by it on PostgreSQL, migration 0014): moved together.
            for model in (Packet, Delivery):
                db.session.execute(
                    update(model).where(model.packet_id.in_(ids)).values(received_at=moment)
                )
        db.session.commit()
    seen, pages = walk(client, f"{API}/packets/user/emp_tie?limit=2")
    assert seen == sorted(tied, reverse=True) + sorted(older, reverse=True)
    assert pages == 5
