"""The client's pooled sessions read the environment once and still honour it.

``requests`` reads proxies, ``~/.netrc`` and the CA bundle from the environment on every call
(about a third of a call's CPU); ``pooled_session`` reads them once for its service. A proxy
named in ``HTTP_PROXY`` is still used, and ``NO_PROXY`` still bypasses it.
"""

from __future__ import annotations

from prana_bucket_client.transport import pooled_session

from tests.karma_stub import karma_stub

UNROUTABLE = "http://karma.invalid:9"  # reached only through the proxy


def test_a_proxy_from_the_environment_is_used(monkeypatch):
    with karma_stub() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        session = pooled_session(UNROUTABLE, 4)
        answer = session.post(
            f"{UNROUTABLE}/api/v1/karma/log-action/",
            json={"user_id": "stu_1", "action": "completing_lessons"},
            headers={"Idempotency-Key": "through-proxy"},
            timeout=10,
        )
        assert answer.status_code == 200
        assert proxy.keys() == {"through-proxy": 1}
        assert session.trust_env is False  # read once, not on every call


def test_no_proxy_still_bypasses_it(monkeypatch):
    with karma_stub() as karma:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        session = pooled_session(karma.url, 4)
        answer = session.post(
            f"{karma.url}/api/v1/karma/log-action/",
            json={"user_id": "stu_1", "action": "completing_lessons"},
            headers={"Idempotency-Key": "direct"},
            timeout=10,
        )
        assert answer.status_code == 200
        assert karma.keys() == {"direct": 1}
