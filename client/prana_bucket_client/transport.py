"""The bucket's consumer endpoints over one pooled ``requests`` session, with back-off."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from requests.adapters import HTTPAdapter

API = "/api/v1/bucket/prana"
# Answers that say "try again later": rate limits, an overloaded or restarting service, a
# proxy in front that could not reach it. Connection errors and timeouts are treated alike.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})

log = logging.getLogger("prana_bucket_client")


class Unavailable(Exception):
    """The bucket did not answer usefully (connection error, timeout, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Refused(Exception):
    """The bucket refused the request for good (4xx other than 429): retrying will not help."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class Backoff:
    """Exponential back-off with full jitter (AWS's "full jitter"), never below ``Retry-After``.

    ``delay()`` gives the next pause and counts the failure; ``reset()`` after a success.
    """

    base: float = 0.25
    cap: float = 30.0
    failures: int = 0

    def delay(self, retry_after: float | None = None) -> float:
        ceiling = min(self.cap, self.base * (2**self.failures))
        self.failures += 1
        pause = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            # A server that names a time is believed, with a little jitter so that every
            # consumer told "1 s" does not come back in the same millisecond.
            pause = max(pause, retry_after + random.uniform(0, min(1.0, retry_after / 4 + 0.05)))
        return pause

    def reset(self) -> None:
        self.failures = 0


def pooled_session(
    base_url: str, pool_size: int, session: requests.Session | None = None
) -> requests.Session:
    """A session for one service: ``pool_size`` keep-alive connections, the environment read once.

    ``requests`` reads proxies (``HTTP_PROXY``, ``NO_PROXY``, ...), ``~/.netrc`` and
    ``REQUESTS_CA_BUNDLE`` from the environment again on every call, which costs about a third
    of a call's CPU; a consumer's sessions each talk to one service, so this reads them once, for
    that service, with the same outcome, and turns the per-call reading off.
    """
    session = session or requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(1, pool_size))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if session.trust_env:
        for scheme, proxy in requests.utils.get_environ_proxies(base_url).items():
            session.proxies.setdefault(scheme, proxy)
        if session.auth is None:
            session.auth = requests.utils.get_netrc_auth(base_url)
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle and session.verify is True:
            session.verify = bundle
        session.trust_env = False
    return session


class BucketTransport:
    """The four consumer calls (poll, acknowledge, change a lease, status) on one session.

    Each method makes one attempt and raises :class:`Unavailable` or :class:`Refused`; the
    caller decides whether and when to retry (see :meth:`call_until`).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        pool_size: int = 8,
        timeout: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = pooled_session(self.base_url, pool_size, session)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.session.close()

    def _request(self, method: str, path: str, *, timeout: float, **kwargs: Any) -> tuple[int, Any]:
        url = f"{self.base_url}{API}{path}"
        try:
            response = self.session.request(method, url, timeout=timeout, **kwargs)
        except requests.RequestException as exc:
            raise Unavailable(f"{method} {path}: {exc.__class__.__name__}: {exc}") from exc
        if response.status_code in RETRYABLE_STATUSES or response.status_code >= 500:
            raise Unavailable(
                f"{method} {path}: HTTP {response.status_code}",
                retry_after_seconds(response.headers.get("Retry-After")),
            )
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400 and response.status_code not in (404, 409):
            raise Refused(response.status_code, body)
        return response.status_code, body

    def poll(self, limit: int, visibility_timeout: int, wait: float) -> dict[str, Any]:
        """Lease up to ``limit`` packets (``GET pending``), long-polling up to ``wait`` s."""
        params = {"limit": limit, "visibility_timeout": visibility_timeout, "wait": wait}
        status, body = self._request(
            "GET", "/packets/pending", params=params, timeout=wait + self.timeout
        )
        if status != 200:
            raise Refused(status, body)
        return body

    def acknowledge(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Record many outcomes in one ``mark-processed`` request; one answer per result."""
        status, body = self._request(
            "POST", "/packets/mark-processed", json={"results": results}, timeout=self.timeout
        )
        if not isinstance(body, dict) or "results" not in body:
            raise Refused(status, body)
        return body["results"]

    def acknowledge_one(self, result: dict[str, Any]) -> tuple[int, Any]:
        """The single-packet ``mark-processed`` the original poller sends: (status, body)."""
        return self._request("POST", "/packets/mark-processed", json=result, timeout=self.timeout)

    def change_lease(
        self, packet_id: str, receipt: str, visibility_timeout: int
    ) -> tuple[int, Any]:
        """Extend a lease (``visibility_timeout`` > 0) or release it (0): (status, body)."""
        return self._request(
            "POST",
            "/packets/lease",
            json={
                "packet_id": packet_id,
                "receipt": receipt,
                "visibility_timeout": visibility_timeout,
            },
            timeout=self.timeout,
        )

    def call_until(
        self,
        call: Callable[[], Any],
        stop: threading.Event | None,
        backoff: Backoff,
        what: str,
        on_retry: Callable[[], None] | None = None,
    ) -> Any:
        """Run ``call`` until it stops raising :class:`Unavailable`, backing off in between.

        With ``stop`` given, gives up (re-raising) once it is set; otherwise tries forever.
        """
        while True:
            try:
                answer = call()
            except Unavailable as exc:
                pause = backoff.delay(exc.retry_after)
                if on_retry:
                    on_retry()
                log.warning("bucket unavailable (%s); %s again in %.2f s", exc, what, pause)
                if stop is not None:
                    if stop.wait(pause):
                        raise
                else:
                    time.sleep(pause)
                continue
            backoff.reset()
            return answer
