"""A slow JWKS provider does not stall ingest: requests whose key is cached never wait for a
refresh; only a request naming a key not cached waits, at most the fetch timeout.

Each test runs on SQLite + memory and PostgreSQL + Redis through the HTTP API, against a
local JWKS server that answers as slowly as the test asks.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from tests.test_ingest_auth import (
    INGEST,
    OTHER_RSA_KEY,
    RSA_KEY,
    bearer,
    jwks_file,
    packet,
    rs256,
    stored,
)

SLOW = 3.0  # seconds the provider takes once it turns slow
QUICK = 1.5  # a request that did not wait for the provider answers well within this


class SlowJwks:
    """A JWKS server on 127.0.0.1 whose document and delay the test changes as it goes."""

    def __init__(self, document: dict) -> None:
        self.document, self.delay = document, 0.0
        self.fetching = threading.Event()
        self.fetches = 0
        jwks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the standard library's name
                jwks.fetches += 1
                jwks.fetching.set()
                time.sleep(jwks.delay)
                payload = json.dumps(jwks.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/jwks.json"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def provider(tmp_path):
    document = json.loads(Path(jwks_file(tmp_path, ("k1", RSA_KEY))).read_text())
    jwks = SlowJwks(document)
    yield jwks
    jwks.stop()


def timed_post(client, headers: dict) -> tuple[int, float]:
    started = time.monotonic()
    response = client.post(INGEST, json=packet(), headers=headers)
    return response.status_code, time.monotonic() - started


def expire(app) -> None:
    """As if the cache's lifetime and the minimum interval between fetches had passed."""
    jwks = app.extensions["bucket.ingest_auth"].jwks
    jwks._fetched_at -= 10_000
    jwks._tried_at -= 60


def test_cached_keys_keep_verifying_while_a_slow_provider_is_asked_for_a_new_kid(
    make_app, provider, tmp_path
):
    """A token naming a rotated-in kid makes the bucket fetch from a provider now taking 3 s;
    meanwhile tokens with the cached kid are answered at once. The new kid's request waits
    for the fetch, and verifies."""
    app = make_app(
        BUCKET_INGEST_AUTH="require",
        BUCKET_INGEST_JWKS_URL=provider.url,
        BUCKET_INGEST_JWKS_TIMEOUT=5,
    )
    client = app.test_client()
    assert timed_post(client, bearer(rs256(kid="k1")))[0] == 200
    assert provider.fetches == 1
    rotated = jwks_file(tmp_path, ("k1", RSA_KEY), ("k2", OTHER_RSA_KEY))
    provider.document = json.loads(Path(rotated).read_text())
    provider.delay, provider.fetching = SLOW, threading.Event()
    expire(app)
    waiting: dict = {}

    def new_kid():
        token = bearer(rs256(kid="k2", key=OTHER_RSA_KEY))
        waiting["answer"] = timed_post(app.test_client(), token)

    other = threading.Thread(target=new_kid)
    other.start()
    assert provider.fetching.wait(5), "the new kid did not make the bucket ask the provider"
    for n in range(3):
        status, took = timed_post(client, bearer(rs256(kid="k1", jti=f"cached-{n}")))
        assert status == 200 and took < QUICK, took
    other.join(10)
    status, took = waiting["answer"]
    assert status == 200 and took >= SLOW * 0.9, took
    assert provider.fetches == 2 and len(stored(app)) == 5


def test_an_expired_cache_is_refreshed_aside_not_on_the_request(make_app, provider):
    """The cache's lifetime is over and the provider now takes 3 s: the request that notices
    is answered with the cached key at once; the refresh happens once, in the background."""
    app = make_app(
        BUCKET_INGEST_AUTH="require",
        BUCKET_INGEST_JWKS_URL=provider.url,
        BUCKET_INGEST_JWKS_TIMEOUT=5,
    )
    client = app.test_client()
    assert timed_post(client, bearer(rs256(kid="k1")))[0] == 200
    provider.delay = SLOW
    expire(app)
    jwks = app.extensions["bucket.ingest_auth"].jwks
    expired_at = jwks._fetched_at
    for n in range(3):
        status, took = timed_post(client, bearer(rs256(kid="k1", jti=f"expired-{n}")))
        assert status == 200 and took < QUICK, took
    assert provider.fetching.wait(5)
    deadline = time.monotonic() + 10
    while jwks._fetched_at == expired_at and time.monotonic() < deadline:
        time.sleep(0.05)
    assert jwks._fetched_at > expired_at and provider.fetches == 2
