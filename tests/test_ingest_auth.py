"""Authenticated ingest: forged tokens refused under ``require``, outcomes stored and shown
under ``observe``, a forgery never shadowing the genuine packet, the outcome sealed.

Each test runs on SQLite + memory and PostgreSQL + Redis through the HTTP API.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import select, text

from bucket import create_app
from bucket.exceptions import IngestAuthMisconfigured
from bucket.extensions import db
from bucket.models import QuarantinedPacket
from bucket.services.audit.sealing import seal_everything
from bucket.services.listing import LISTED
from tests.factories import make_packet
from tests.test_audit import artifact, outside_check, verify

API = "/api/v1/bucket/prana"
INGEST = f"{API}/ingest"
SECRET = "gurukul-shared-secret-of-at-least-32-bytes!"
AUDIENCE, ISSUER = "prana-bucket", "https://gurukul.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_pem(key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def claims(user="stu_a", session="sess_a", **extra) -> dict:
    now = int(time.time())
    body = {"sub": user, "session_id": session, "iat": now, "exp": now + 600, "jti": "j1"}
    body.update(extra)
    return {name: value for name, value in body.items() if value is not None}


def hs256(user="stu_a", secret=SECRET, **extra) -> str:
    return jwt.encode(claims(user, **extra), secret, algorithm="HS256")


def rs256(user="stu_a", key=RSA_KEY, kid=None, **extra) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(user, **extra), key, algorithm="RS256", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(user="stu_a") -> str:
    """``alg: none``: a token anyone can write."""
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims(user)).encode())}."


def hs256_keyed_with_public_key(user="stu_a") -> str:
    """The classic confusion: HS256 whose secret is the RSA public key's PEM text."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(user)).encode())
    mac = hmac.HMAC(public_pem(RSA_KEY).encode(), hashes.SHA256())
    mac.update(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{b64(mac.finalize())}"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def packet(user="stu_a", session="sess_a", **overrides) -> dict:
    return make_packet(user_id=user, session_id=session, **overrides)


def stored(app) -> list[dict]:
    """Every stored packet as the service reads it (coded strings decoded: migration 0022)."""
    with app.app_context():
        rows = db.session.execute(select(*LISTED)).mappings().all()
        db.session.commit()
        return [dict(row) for row in rows]


def quarantined(app) -> int:
    with app.app_context():
        count = db.session.query(QuarantinedPacket).count()
        db.session.commit()
        return count


def rsa_settings(**more) -> dict:
    return {
        "BUCKET_INGEST_AUTH": "require",
        "BUCKET_INGEST_JWT_PUBLIC_KEY": public_pem(RSA_KEY),
        "BUCKET_INGEST_JWT_AUDIENCE": AUDIENCE,
        "BUCKET_INGEST_JWT_ISSUER": ISSUER,
        **more,
    }


def rsa_token(user="stu_a", **extra) -> str:
    return rs256(user, aud=AUDIENCE, iss=ISSUER, **extra)


# --- refused under require ---------------------------------------------------------------

FORGERIES = {
    "no token": (None, 401, "missing"),
    "wrong key": (lambda: rs256("stu_a", key=OTHER_RSA_KEY, aud=AUDIENCE, iss=ISSUER), 401, None),
    "alg none": (lambda: unsigned("stu_a"), 401, None),
    "hs256 keyed with the public key": (lambda: hs256_keyed_with_public_key("stu_a"), 401, None),
    "expired": (lambda: rsa_token(exp=int(time.time()) - 3600), 401, None),
    "not yet valid": (lambda: rsa_token(nbf=int(time.time()) + 3600), 401, None),
    "wrong audience": (lambda: rs256("stu_a", aud="someone-else", iss=ISSUER), 401, None),
    "wrong issuer": (lambda: rs256("stu_a", aud=AUDIENCE, iss="https://evil.example"), 401, None),
    "garbage": (lambda: "not.a.jwt", 401, None),
    "another user's valid token": (lambda: rsa_token("stu_b", session="sess_a"), 403, None),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_each_forged_token_is_refused_under_require_and_nothing_is_kept(make_app, name):
    """401 (missing or invalid) or 403 (another user's), in the error shape naming the reason
    and no key; nothing stored, nothing quarantined, the refusal counted."""
    app = make_app(**rsa_settings())
    client = app.test_client()
    make_token, status, reason = FORGERIES[name]
    headers = bearer(make_token()) if make_token else {}
    response = client.post(INGEST, json=packet(), headers=headers)
    assert response.status_code == status, response.json
    body = response.json
    assert body["code"] == status and body["message"]
    assert "BEGIN" not in body["message"] and SECRET not in json.dumps(body)
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert stored(app) == [] and quarantined(app) == 0
    counted = client.get(f"{API}/status").json["auth_refused"]
    expected = reason or ("mismatch" if status == 403 else "invalid")
    assert counted[expected] == 1
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'bucket_ingest_auth_refused_total{{reason="{expected}"}}' in metrics
    # the genuine token of the same user still gets in
    genuine = client.post(INGEST, json=packet(), headers=bearer(rsa_token()))
    assert genuine.status_code == 200, genuine.json


def test_the_right_user_with_another_session_is_refused_when_sessions_are_bound(make_app):
    """BUCKET_INGEST_JWT_SESSION_CLAIM binds the token to the packet's session_id."""
    app = make_app(**rsa_settings(BUCKET_INGEST_JWT_SESSION_CLAIM="session_id"))
    client = app.test_client()
    other_session = bearer(rsa_token(session="sess_other"))
    response = client.post(INGEST, json=packet(session="sess_a"), headers=other_session)
    assert response.status_code == 403, response.json
    assert "session" in response.json["message"]
    ok = client.post(INGEST, json=packet(session="sess_other"), headers=other_session)
    assert ok.status_code == 200
    assert [row["auth_outcome"] for row in stored(app)] == ["verified"]


def test_a_token_without_the_bound_session_claim_is_invalid(make_app):
    app = make_app(**rsa_settings(BUCKET_INGEST_JWT_SESSION_CLAIM="session_id"))
    response = app.test_client().post(
        INGEST, json=packet(), headers=bearer(rsa_token(session=None))
    )
    assert response.status_code == 401
    assert "missing claim session_id" in response.json["message"]


def jwks_file(tmp_path, *keys) -> str:
    document = {"keys": []}
    for kid, key in keys:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        document["keys"].append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(document))
    return str(path)


def test_jwks_keys_are_chosen_by_kid_and_an_unknown_kid_is_refused(make_app, tmp_path):
    """A JWKS document (here a file): the token's kid picks the key; an unknown kid is
    refused even when its signature would hold under another key."""
    location = jwks_file(tmp_path, ("k1", RSA_KEY))
    app = make_app(BUCKET_INGEST_AUTH="require", BUCKET_INGEST_JWKS_URL=location)
    client = app.test_client()
    assert client.post(INGEST, json=packet(), headers=bearer(rs256(kid="k1"))).status_code == 200
    unknown = client.post(INGEST, json=packet(), headers=bearer(rs256(kid="k9")))
    assert unknown.status_code == 401 and "unknown key" in unknown.json["message"]
    wrong = client.post(INGEST, json=packet(), headers=bearer(rs256(kid="k1", key=OTHER_RSA_KEY)))
    assert wrong.status_code == 401
    assert len(stored(app)) == 1


def test_a_jwks_url_is_fetched_cached_and_refetched_for_a_new_kid(make_app, tmp_path):
    """Fetched over HTTP with a timeout, cached, and asked again when a token names a kid it
    has not seen (a rotated key), not on every request."""
    import http.server
    import threading

    document = {"body": json.loads(Path(jwks_file(tmp_path, ("k1", RSA_KEY))).read_text())}
    fetches = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the standard library's name
            fetches.append(self.path)
            payload = json.dumps(document["body"]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/jwks.json"
        app = make_app(BUCKET_INGEST_AUTH="require", BUCKET_INGEST_JWKS_URL=url)
        client = app.test_client()
        for _ in range(3):
            response = client.post(INGEST, json=packet(), headers=bearer(rs256(kid="k1")))
            assert response.status_code == 200
        assert len(fetches) == 1
        # the provider rotates in k2; the first token naming it makes the bucket look again
        rotated_file = jwks_file(tmp_path, ("k1", RSA_KEY), ("k2", OTHER_RSA_KEY))
        document["body"] = json.loads(Path(rotated_file).read_text())
        verifier = app.extensions["bucket.ingest_auth"]
        verifier.jwks._tried_at -= 60  # past the minimum interval between refreshes
        rotated = bearer(rs256(kid="k2", key=OTHER_RSA_KEY))
        assert client.post(INGEST, json=packet(), headers=rotated).status_code == 200
        assert len(fetches) == 2
        # made-up kids do not turn into a fetch each
        for n in range(3):
            bad = bearer(rs256(kid=f"made-up-{n}"))
            assert client.post(INGEST, json=packet(), headers=bad).status_code == 401
        assert len(fetches) == 2
        # the provider goes away: the keys fetched before keep verifying, and it is asked
        # again at most every 30 s, not once per request
        server.shutdown()
        server.server_close()
        verifier.jwks._fetched_at -= 10_000  # the cache has expired
        verifier.jwks._tried_at -= 60
        tries = []
        load = verifier.jwks._load
        verifier.jwks._load = lambda: tries.append(1) or load()
        for n in range(3):  # tokens not seen before: each needs its key
            fresh = bearer(rs256(kid="k2", key=OTHER_RSA_KEY, jti=f"after-{n}"))
            assert client.post(INGEST, json=packet(), headers=fresh).status_code == 200
        deadline = time.monotonic() + 5  # the expired cache is refreshed aside, in a thread
        while (not tries or verifier.jwks._refreshing) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(tries) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_es256_with_a_pem_key_and_hs256_with_a_secret_both_verify(make_app):
    """Each key verifies its own kind of algorithm."""
    app = make_app(
        BUCKET_INGEST_AUTH="require",
        BUCKET_INGEST_JWT_SECRET=SECRET,
        BUCKET_INGEST_JWT_PUBLIC_KEY=public_pem(EC_KEY),
        BUCKET_INGEST_JWT_ALGORITHMS=["HS256", "ES256"],
    )
    client = app.test_client()
    es = jwt.encode(claims(), EC_KEY, algorithm="ES256")
    assert client.post(INGEST, json=packet(), headers=bearer(es)).status_code == 200
    assert client.post(INGEST, json=packet(), headers=bearer(hs256())).status_code == 200
    forged = hs256(secret="guessed-secret-guessed-secret-guessed")
    assert client.post(INGEST, json=packet(), headers=bearer(forged)).status_code == 401


def test_leeway_accepts_a_token_expired_a_moment_ago(make_app):
    app = make_app(
        BUCKET_INGEST_AUTH="require", BUCKET_INGEST_JWT_SECRET=SECRET, BUCKET_INGEST_JWT_LEEWAY=60
    )
    client = app.test_client()
    just = hs256(exp=int(time.time()) - 20)
    assert client.post(INGEST, json=packet(), headers=bearer(just)).status_code == 200
    long_ago = hs256(exp=int(time.time()) - 120)
    assert client.post(INGEST, json=packet(), headers=bearer(long_ago)).status_code == 401


@pytest.mark.parametrize(
    "settings, says",
    [
        ({"BUCKET_INGEST_AUTH": "require"}, "needs a key"),
        ({"BUCKET_INGEST_AUTH": "observe"}, "needs a key"),
        ({"BUCKET_INGEST_AUTH": "sometimes", "BUCKET_INGEST_JWT_SECRET": SECRET}, "one of"),
        ({"BUCKET_INGEST_AUTH": "require", "BUCKET_INGEST_JWT_PUBLIC_KEY": "/no/such.pem"}, "PEM"),
        (
            {"BUCKET_INGEST_AUTH": "require", "BUCKET_INGEST_JWT_PUBLIC_KEY": "-----BEGIN x"},
            "not a public key",
        ),
        ({"BUCKET_INGEST_AUTH": "require", "BUCKET_INGEST_JWKS_URL": "/no/jwks.json"}, "JWKS"),
        (
            {"BUCKET_INGEST_AUTH": "require", "BUCKET_INGEST_JWT_SECRET": public_pem(RSA_KEY)},
            "never keys an HMAC check",
        ),
        (
            {
                "BUCKET_INGEST_AUTH": "require",
                "BUCKET_INGEST_JWT_SECRET": SECRET,
                "BUCKET_INGEST_JWT_ALGORITHMS": ["HS256", "none"],
            },
            "never allow 'none'",
        ),
        (
            {
                "BUCKET_INGEST_AUTH": "require",
                "BUCKET_INGEST_JWT_PUBLIC_KEY": public_pem(RSA_KEY),
                "BUCKET_INGEST_JWT_ALGORITHMS": ["HS256"],
            },
            "needs BUCKET_INGEST_JWT_SECRET",
        ),
        (
            {
                "BUCKET_INGEST_AUTH": "require",
                "BUCKET_INGEST_JWT_SECRET": SECRET,
                "BUCKET_INGEST_JWT_ALGORITHMS": ["RS256"],
            },
            "needs BUCKET_INGEST_JWT_PUBLIC_KEY",
        ),
    ],
)
def test_a_misconfiguration_stops_the_service_at_start(tmp_path, settings, says):
    """Never a silent ``off``: the factory raises, naming the setting."""
    with pytest.raises(IngestAuthMisconfigured, match=says):
        create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/x.db", **settings}, True)


def test_the_environment_names_configure_it(monkeypatch, tmp_path):
    """The variable names operators and tests rely on."""
    key = tmp_path / "key.pem"
    key.write_text(public_pem(RSA_KEY))
    for name, value in {
        "BUCKET_INGEST_AUTH": "observe",
        "BUCKET_INGEST_JWT_PUBLIC_KEY": str(key),
        "BUCKET_INGEST_JWT_ALGORITHMS": "RS256",
        "BUCKET_INGEST_JWT_USER_CLAIM": "uid",
        "BUCKET_INGEST_JWT_SESSION_CLAIM": "sid",
        "BUCKET_INGEST_JWT_AUDIENCE": "aud-x",
        "BUCKET_INGEST_JWT_ISSUER": "iss-y",
        "BUCKET_INGEST_JWT_LEEWAY": "5",
    }.items():
        monkeypatch.setenv(name, value)
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/x.db"}, testing=True)
    verifier = app.extensions["bucket.ingest_auth"]
    assert verifier.mode == "observe" and verifier.algorithms == {"RS256"}
    assert (verifier.user_claim, verifier.session_claim) == ("uid", "sid")
    assert (verifier.audience, verifier.issuer, verifier.leeway) == ("aud-x", "iss-y", 5.0)


# --- batches -------------------------------------------------------------------------------


def test_a_batch_mixing_two_users_under_one_token_is_judged_per_packet(make_app):
    """Under require: the token's user's packets are stored, the other user's refused one by
    one (not quarantined); the answer is 207."""
    app = make_app(**rsa_settings())
    client = app.test_client()
    body = {"packets": [packet("stu_a"), packet("stu_b"), packet("stu_a")]}
    response = client.post(INGEST, json=body, headers=bearer(rsa_token("stu_a")))
    assert response.status_code == 207, response.json
    statuses = [item["status"] for item in response.json["results"]]
    assert statuses == ["ingested", "rejected", "ingested"]
    assert "mismatch" in response.json["results"][1]["errors"]["auth"][0]
    assert "quarantine_id" not in response.json["results"][1]
    assert sorted(row["user_id"] for row in stored(app)) == ["stu_a", "stu_a"]
    assert quarantined(app) == 0
    assert client.get(f"{API}/status").json["auth_refused"]["mismatch"] == 1
    only_b = {"packets": [packet("stu_b")]}
    refused = client.post(INGEST, json=only_b, headers=bearer(rsa_token("stu_a")))
    assert refused.status_code == 403
    unsigned_batch = client.post(INGEST, json=body)
    assert unsigned_batch.status_code == 401
    assert client.get(f"{API}/status").json["auth_refused"] == {
        "missing": 3,
        "invalid": 0,
        "mismatch": 2,
    }


def test_observe_stores_the_mixed_batch_and_marks_each_packet(make_app):
    app = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"))
    client = app.test_client()
    body = {"packets": [packet("stu_a"), packet("stu_b")]}
    response = client.post(INGEST, json=body, headers=bearer(rsa_token("stu_a")))
    assert response.status_code == 200, response.json
    outcomes = {row["user_id"]: (row["auth_outcome"], row["auth_subject"]) for row in stored(app)}
    assert outcomes == {"stu_a": ("verified", "stu_a"), "stu_b": ("mismatch", "stu_a")}


# --- observe: outcomes as stored and as consumers see them -----------------------------------


def test_observe_outcomes_are_stored_and_consumers_see_them(make_app):
    """verified, missing, invalid and mismatch are all stored; pending, the user listing and
    the audit artifact show ``authenticated`` (true only for verified) and ``auth_subject``."""
    app = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"))
    client = app.test_client()
    sent = {
        "verified": client.post(INGEST, json=packet(), headers=bearer(rsa_token())),
        "missing": client.post(INGEST, json=packet()),
        "invalid": client.post(INGEST, json=packet(), headers=bearer(unsigned())),
        "mismatch": client.post(INGEST, json=packet(), headers=bearer(rsa_token("stu_b"))),
    }
    ids = {}
    for outcome, response in sent.items():
        assert response.status_code == 200, (outcome, response.json)
        ids[response.json["packet_id"]] = outcome
    rows = {row["packet_id"]: row for row in stored(app)}
    assert {pid: rows[pid]["auth_outcome"] for pid in ids} == ids
    subjects = {"verified": "stu_a", "missing": None, "invalid": None, "mismatch": "stu_b"}

    pending = client.get(f"{API}/packets/pending?limit=10").json["packets"]
    listed = client.get(f"{API}/packets/user/stu_a").json
    for view in (pending, listed):
        assert len(view) == 4
        for item in view:
            outcome = ids[item["packet_id"]]
            assert item["authenticated"] is (outcome == "verified")
            assert item["auth_outcome"] == outcome
            assert item["auth_subject"] == subjects[outcome]
    with app.app_context():
        seal_everything()
    for pid, outcome in ids.items():
        answer = artifact(client, pid)
        assert answer["authenticated"] is (outcome == "verified")
        assert answer["auth_subject"] == subjects[outcome]
        assert answer["data"]["auth_outcome"] == outcome


def test_with_auth_off_a_token_is_not_looked_at(make_app):
    """The default: nothing checked, outcome null, never authenticated."""
    app = make_app()
    client = app.test_client()
    response = client.post(INGEST, json=packet(), headers=bearer("anything"))
    assert response.status_code == 200
    (item,) = client.get(f"{API}/packets/pending").json["packets"]
    assert (item["authenticated"], item["auth_outcome"], item["auth_subject"]) == (
        False,
        None,
        None,
    )


# --- a forgery must not shadow the genuine packet ---------------------------------------------


def test_under_observe_a_forged_copy_first_does_not_shadow_the_genuine_packet(make_app):
    """The forger posts the learner's packet first, with the same natural identity and the
    same Idempotency-Key; the genuine verified packet is still stored and delivered. The
    forged one stays, marked unauthenticated (consumers withhold karma from it); a verified
    retry of the genuine one is its duplicate."""
    app = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"))
    client = app.test_client()
    genuine = packet(cognitive_state="ON_TASK")
    forged = dict(genuine, cognitive_state="DISTRACTED", focus_score=3)
    key = {"Idempotency-Key": "bridge-key-1"}
    first = client.post(INGEST, json=forged, headers=key)
    assert first.status_code == 200 and "duplicate" not in first.json
    real = client.post(INGEST, json=genuine, headers={**key, **bearer(rsa_token())})
    assert real.status_code == 200
    assert "duplicate" not in real.json and real.json["packet_id"] != first.json["packet_id"]
    retry = client.post(INGEST, json=genuine, headers={**key, **bearer(rsa_token())})
    assert retry.json["duplicate"] is True and retry.json["packet_id"] == real.json["packet_id"]
    again = client.post(INGEST, json=forged, headers=key)
    assert again.json["duplicate"] is True and again.json["packet_id"] == first.json["packet_id"]
    delivered = client.get(f"{API}/packets/pending?limit=10").json["packets"]
    by_id = {item["packet_id"]: item for item in delivered}
    assert set(by_id) == {first.json["packet_id"], real.json["packet_id"]}
    assert by_id[real.json["packet_id"]]["authenticated"] is True
    assert by_id[real.json["packet_id"]]["cognitive_state"] == "ON_TASK"
    assert by_id[first.json["packet_id"]]["authenticated"] is False


def test_under_require_a_forged_copy_is_never_stored_and_the_genuine_one_is(make_app):
    app = make_app(**rsa_settings())
    client = app.test_client()
    genuine = packet()
    forged = dict(genuine, cognitive_state="DISTRACTED")
    key = {"Idempotency-Key": "bridge-key-2"}
    assert client.post(INGEST, json=forged, headers=key).status_code == 401
    stolen = bearer(rsa_token("stu_b"))
    assert client.post(INGEST, json=forged, headers={**key, **stolen}).status_code == 403
    real = client.post(INGEST, json=genuine, headers={**key, **bearer(rsa_token())})
    assert real.status_code == 200 and "duplicate" not in real.json
    (row,) = stored(app)
    assert (row["packet_id"], row["cognitive_state"]) == (real.json["packet_id"], "ON_TASK")


# --- the audit trail --------------------------------------------------------------------------


def test_verify_is_clean_across_the_leaf_format_change(app, client, tmp_path):
    """Seals of leaf format 2 (made before the outcome was sealed) keep verifying; the next
    seal, of format 3, follows them in one chain; the outcome is covered: changing it is
    named, and the standalone verifier proves a format-3 packet and a format-2 one."""
    old = client.post(INGEST, json=packet()).json["packet_id"]
    with app.app_context():
        (first,) = seal_everything()
        db.session.execute(text("UPDATE audit_seals SET leaf_format = 2"))
        # what seal 1 would hold had it been made before migration 0010
        from bucket.models import AuditSeal
        from bucket.services.audit import merkle
        from bucket.services.audit.content import LEAF_SELECT, Leaves, leaf_content_v2, seal_hash

        made = db.session.get(AuditSeal, 1)
        rows = {r["packet_id"]: r for r in db.session.execute(select(*LEAF_SELECT)).mappings()}
        hashes = [merkle.leaf_hash(leaf_content_v2(rows[i])) for i in Leaves.of(made).ids]
        made.leaf_hashes, made.root = b"".join(hashes), merkle.root(hashes).hex()
        made.hash = seal_hash(made)
        db.session.commit()
    new = client.post(INGEST, json=packet()).json["packet_id"]
    with app.app_context():
        seal_everything()
    chain = client.get("/api/v1/bucket/audit/seals?from=1").json
    assert [seal["leaf_format"] for seal in chain] == [2, 3]
    assert chain[1]["previous_hash"] == chain[0]["hash"]
    assert verify(app.test_cli_runner()).exit_code == 0
    head = chain[1]["hash"]
    seals = tmp_path / "seals.json"
    seals.write_text(json.dumps(chain))
    for packet_id, leaf_format in ((old, 2), (new, 3)):
        answer = artifact(client, packet_id)
        assert answer["leaf_format"] == leaf_format
        checked = outside_check(tmp_path, answer, "--seal-hash", head, "--seals", str(seals))
        assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "sender not checked" in checked.stdout
    with app.app_context():
        db.session.execute(
            text("UPDATE packets SET auth_outcome_text = 'verified' WHERE packet_id = :p"),
            {"p": new},
        )
        db.session.commit()
    result = verify(app.test_cli_runner())
    assert result.exit_code == 1 and f"packet {new}" in result.output
    forged_answer = artifact(client, new)
    forged_answer["authenticated"] = True
    lied = outside_check(tmp_path, forged_answer, "--seal-hash", head, "--seals", str(seals))
    assert lied.returncode == 1


# --- freshness and raw_signals --------------------------------------------------------------


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def test_a_packet_from_the_future_is_refused_and_quarantined(make_app):
    app = make_app(BUCKET_MAX_CLOCK_SKEW=3600)
    client = app.test_client()
    ahead = iso(datetime.now(UTC) + timedelta(hours=2))
    response = client.post(INGEST, json=packet(timestamp=ahead))
    assert response.status_code == 422
    assert "future" in response.json["errors"]["json"]["timestamp"][0]
    assert response.json["quarantine_id"] and stored(app) == []
    slightly = iso(datetime.now(UTC) + timedelta(minutes=30))
    assert client.post(INGEST, json=packet(timestamp=slightly)).status_code == 200


def test_a_late_packet_is_stored_and_flagged_stale(make_app):
    """Never refused (the offline queue delivers days later): stored, ``stale: true``."""
    app = make_app(BUCKET_STALE_AFTER=3600)
    client = app.test_client()
    late = client.post(INGEST, json=packet(timestamp=iso(datetime.now(UTC) - timedelta(days=3))))
    fresh = client.post(INGEST, json=packet(timestamp=iso(datetime.now(UTC))))
    assert late.status_code == fresh.status_code == 200
    seen = {
        p["packet_id"]: p["stale"] for p in client.get(f"{API}/packets/pending").json["packets"]
    }
    assert seen == {late.json["packet_id"]: True, fresh.json["packet_id"]: False}


def test_raw_signals_outside_the_allowed_keys_are_refused_and_quarantined(make_app):
    app = make_app(BUCKET_RAW_SIGNALS_KEYS=["tab_visible", "n", "dwell_time_ms"])
    client = app.test_client()
    leaking = packet(raw_signals={"tab_visible": True, "session_token": "eyJ..."})
    response = client.post(INGEST, json=leaking)
    assert response.status_code == 422
    assert "session_token" in response.json["errors"]["json"]["raw_signals"][0]
    assert quarantined(app) == 1 and stored(app) == []
    assert client.post(INGEST, json=packet(raw_signals={"tab_visible": True})).status_code == 200


# --- the edges: CORS, rate limits -------------------------------------------------------------


def test_cors_preflight_allows_the_authorization_header(client):
    response = client.options(
        INGEST,
        headers={
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-client-timestamp",
        },
    )
    assert response.status_code == 200
    assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()


def test_verified_subjects_are_limited_on_their_own_not_by_the_shared_address(make_app):
    """A classroom behind one NAT address: each verified learner has an allowance; the
    address's allowance keeps counting the unauthenticated requests."""
    app = make_app(
        BUCKET_RATE_LIMIT_ENABLED=True,
        BUCKET_RATE_LIMIT_INGEST_PER_IP="3 per minute",
        BUCKET_RATE_LIMIT_INGEST_PER_USER="1000 per minute",
        BUCKET_RATE_LIMIT_INGEST_PER_SUBJECT="2 per minute",
        **rsa_settings(BUCKET_INGEST_AUTH="observe"),
    )
    client = app.test_client()
    for learner in ("stu_1", "stu_2", "stu_3"):
        for _ in range(2):
            response = client.post(INGEST, json=packet(learner), headers=bearer(rsa_token(learner)))
            assert response.status_code == 200, response.json
        third = client.post(INGEST, json=packet(learner), headers=bearer(rsa_token(learner)))
        assert third.status_code == 429
    for _ in range(3):
        assert client.post(INGEST, json=packet("stu_9")).status_code == 200
    assert client.post(INGEST, json=packet("stu_9")).status_code == 429


# --- the console's figures ---------------------------------------------------------------------


def test_the_console_series_give_the_verified_share_and_refusals_per_minute(make_app):
    """Booked packets by outcome give each minute's verified share; refusals by reason."""
    from bucket.services.bookkeeping import book_new_packets

    observing = make_app(**rsa_settings(BUCKET_INGEST_AUTH="observe"))
    client = observing.test_client()
    assert client.post(INGEST, json=packet(), headers=bearer(rsa_token())).status_code == 200
    assert client.post(INGEST, json=packet()).status_code == 200
    requiring = make_app(**rsa_settings()).test_client()
    assert requiring.post(INGEST, json=packet()).status_code == 401
    with observing.app_context():
        book_new_packets()
    hour = client.get(f"{API}/stats/timeseries?window=1h").json
    share = [value for value in hour["verified_share"] if value is not None]
    assert share in ([0.5], [1.0, 0.0])  # the two may straddle a minute
    assert sum(hour["refused"]["missing"]) == 1
    assert sum(hour["refused"]["invalid"]) == sum(hour["refused"]["mismatch"]) == 0


def test_a_reused_token_stops_verifying_when_it_expires(make_app):
    """Verified tokens are remembered (a bridge sends the same one every 5 s), never past
    their expiry: the same token text is refused once ``exp`` (plus leeway) has passed."""
    app = make_app(
        BUCKET_INGEST_AUTH="require", BUCKET_INGEST_JWT_SECRET=SECRET, BUCKET_INGEST_JWT_LEEWAY=0
    )
    client = app.test_client()
    expires = int(time.time()) + 2
    short = bearer(hs256(exp=expires))
    assert client.post(INGEST, json=packet(), headers=short).status_code == 200
    assert client.post(INGEST, json=packet(), headers=short).status_code == 200
    time.sleep(max(0.0, expires + 1.1 - time.time()))
    refused = client.post(INGEST, json=packet(), headers=short)
    assert refused.status_code == 401 and "expired" in refused.json["message"]
