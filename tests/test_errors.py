"""Unexpected failures answer 500 in the one JSON error shape, after rolling the session back.

The rest of the suite runs with ``TESTING`` on, which propagates exceptions to the test client
so the 500 handler never runs; these tests switch propagation off, as in production.
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text

from bucket.extensions import db
from tests.queue_helpers import status

BOOM = "/_test/boom"


@pytest.fixture
def production_errors(make_app):
    """An app that handles exceptions as production does, with two routes that fail."""
    app = make_app(PROPAGATE_EXCEPTIONS=False)

    def boom():
        # A write that must not survive the failure: the handler rolls the session back.
        db.session.execute(
            text("INSERT INTO packet_counters (name, shard, value) VALUES ('x', 0, 1)")
        )
        raise RuntimeError("secret internals: password=hunter2")

    def bad_sql():
        db.session.execute(text("SELECT no_such_column FROM packets"))

    app.add_url_rule(BOOM, "boom", boom, methods=["GET", "POST"])
    app.add_url_rule("/_test/bad-sql", "bad_sql", bad_sql)
    return app


def assert_500_shape(response) -> None:
    assert response.status_code == 500
    assert response.mimetype == "application/json"
    assert response.json == {
        "code": 500,
        "status": "Internal Server Error",
        "message": "Internal server error.",
    }


def test_an_unhandled_exception_answers_json_500_without_internals(production_errors, caplog):
    """A bug answers the one error shape, leaks nothing, and is logged with its traceback."""
    client = production_errors.test_client()
    with caplog.at_level(logging.ERROR, logger="bucket.web.errors"):
        response = client.get(BOOM)
    assert_500_shape(response)
    assert "hunter2" not in response.get_data(as_text=True)
    (record,) = [r for r in caplog.records if r.name == "bucket.web.errors"]
    assert record.exc_info and record.exc_info[0] is RuntimeError


def test_the_500_handler_rolls_the_session_back(production_errors):
    """The half-done write of the failed request is not committed by a later request."""
    client = production_errors.test_client()
    assert_500_shape(client.post(BOOM))
    assert status(client)["total_packets"] == 0  # the next request on the same session works
    with production_errors.app_context():
        leftovers = db.session.execute(
            text("SELECT count(*) FROM packet_counters WHERE name = 'x'")
        ).scalar_one()
        db.session.commit()
    assert leftovers == 0


def test_a_database_error_that_is_a_bug_is_a_500_not_a_503(production_errors):
    """SQL the database refuses is our bug (500); only connection failures are outages (503)."""
    response = production_errors.test_client().get("/_test/bad-sql")
    assert_500_shape(response)
    assert "Retry-After" not in response.headers
