"""Authenticated ingest's cost: single ingest with token verification off, HS256 and RS256.

    .venv/bin/python -m bench.auth_ingest                 # 12 rounds of 300 requests each mode
    .venv/bin/python -m bench.auth_ingest --quick         # 6 rounds of 100
    .venv/bin/python -m bench.auth_ingest --smoke         # seconds: proves it still runs
    .venv/bin/python -m bench.auth_ingest --database-url postgresql://…   # an empty database

Three applications share one database: ``BUCKET_INGEST_AUTH=off`` (no header looked at),
``require`` with an HS256 secret, ``require`` with an RS256 public key. Each round posts the
same number of single packets (each with a valid token of its user) to each app in turn, and
the order rotates every round, so the machine's weather falls on all three alike; the median of
the rounds' per-request times is reported, with each mode's overhead against ``off`` (the goal
of BENCHMARKS.md: within 5 %) and the cost of the token check alone. Requests go through
Flask's test client in this process (no HTTP server), so the figure is the service's own CPU
per request: the share the check adds to it is an upper bound of what it adds behind gunicorn.
Prints a table and one JSON line (``BENCH_AUTH_JSON``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jwt  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402

INGEST = "/api/v1/bucket/prana/ingest"
SECRET = "bench-shared-secret-of-at-least-32-bytes!!"
MODES = ("off", "hs256", "rs256")
SIZES = {"full": (12, 300), "quick": (6, 100), "smoke": (2, 20)}


def settings(mode: str, pem: str) -> dict:
    """The app configuration of one mode (rate limits off: they would cost all modes alike)."""
    base = {"BUCKET_RATE_LIMIT_ENABLED": False, "BUCKET_REQUEST_LOG": False}
    if mode == "hs256":
        return {**base, "BUCKET_INGEST_AUTH": "require", "BUCKET_INGEST_JWT_SECRET": SECRET}
    if mode == "rs256":
        return {**base, "BUCKET_INGEST_AUTH": "require", "BUCKET_INGEST_JWT_PUBLIC_KEY": pem}
    return base


class Packets:
    """Fresh packets of a few users, each with a distinct timestamp (never a duplicate)."""

    def __init__(self) -> None:
        self.start = datetime.now(UTC) - timedelta(minutes=30)
        self.n = 0

    def next(self) -> dict:
        self.n += 1
        return {
            "user_id": f"bench_{self.n % 50}",
            "session_id": "bench_session",
            "system_type": "gurukul",
            "timestamp": (self.start + timedelta(milliseconds=self.n)).isoformat(),
            "cognitive_state": "ON_TASK",
            "active_seconds": 4.0,
            "idle_seconds": 1.0,
            "away_seconds": 0.0,
            "focus_score": 70,
            "raw_signals": {"tab_visible": True, "dwell_time_ms": 5000},
        }


def tokens(mode: str, key) -> dict[str, str]:
    """One valid token per bench user for the mode (None for ``off``: no header)."""
    now = int(time.time())
    made = {}
    for user in range(50):
        claims = {"sub": f"bench_{user}", "iat": now, "exp": now + 3600}
        if mode == "hs256":
            made[f"bench_{user}"] = jwt.encode(claims, SECRET, algorithm="HS256")
        elif mode == "rs256":
            made[f"bench_{user}"] = jwt.encode(claims, key, algorithm="RS256")
    return made


def one_round(client, mode: str, packets: Packets, held: dict[str, str], count: int) -> float:
    """Post ``count`` single packets; seconds per request."""
    bodies = [packets.next() for _ in range(count)]
    started = time.perf_counter()
    for body in bodies:
        token = held.get(body["user_id"])
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = client.post(INGEST, json=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"{mode}: {response.status_code} {response.get_data(as_text=True)}")
    return (time.perf_counter() - started) / count


def check_cost(app, held: dict[str, str], count: int) -> dict[str, float]:
    """Microseconds of the token check alone: a token seen before (the bridge resends its
    page's token every 5 s; verified tokens are remembered) and a first sight (the signature
    checked)."""
    verifier = app.extensions["bucket.ingest_auth"]
    token = next(iter(held.values()))
    figures = {}
    for name, check in (("seen", verifier.check), ("first", verifier._check)):
        started = time.perf_counter()
        for _ in range(count):
            check(token)
        figures[name] = round((time.perf_counter() - started) / count * 1e6, 1)
    return figures


def run(database_url: str | None, size: str) -> dict:
    """Build the three apps on one migrated database and alternate them; the figures."""
    from flask_migrate import upgrade

    from bucket import create_app
    from bucket.extensions import db

    rounds, per_round = SIZES[size]
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as workdir:
        url = database_url or f"sqlite:///{Path(workdir) / 'bench.sqlite3'}"
        apps = {
            mode: create_app({"SQLALCHEMY_DATABASE_URI": url, **settings(mode, pem)})
            for mode in MODES
        }
        with apps["off"].app_context():
            upgrade()
        clients = {mode: app.test_client() for mode, app in apps.items()}
        held = {mode: tokens(mode, key) for mode in MODES}
        packets = Packets()
        for mode in MODES:  # warm-up: statement caches, connections, key parsing
            one_round(clients[mode], mode, packets, held[mode], max(5, per_round // 10))
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for number in range(rounds):
            order = MODES[number % 3 :] + MODES[: number % 3]
            for mode in order:
                times[mode].append(one_round(clients[mode], mode, packets, held[mode], per_round))
        checks = {mode: check_cost(apps[mode], held[mode], per_round * 5) for mode in MODES[1:]}
        for app in apps.values():
            with app.app_context():
                for engine in db.engines.values():
                    engine.dispose()
    median_us = {mode: statistics.median(values) * 1e6 for mode, values in times.items()}
    return {
        "size": size,
        "rounds": rounds,
        "requests_per_round": per_round,
        "database": "postgresql" if url.startswith("postgres") else "sqlite",
        "median_us_per_request": {mode: round(value, 1) for mode, value in median_us.items()},
        "overhead_vs_off_percent": {
            mode: round((median_us[mode] / median_us["off"] - 1) * 100, 2) for mode in MODES[1:]
        },
        "check_us": checks,
    }


def table(results: dict) -> str:
    lines = [
        f"single ingest, {results['rounds']} alternated rounds of "
        f"{results['requests_per_round']} ({results['database']})",
        f"{'mode':<8}{'µs/request':>12}{'vs off':>10}{'check µs (seen/first)':>24}",
    ]
    for mode in MODES:
        overhead = results["overhead_vs_off_percent"].get(mode)
        check = results["check_us"].get(mode)
        check_text = "" if check is None else f"{check['seen']:.1f} / {check['first']:.1f}"
        lines.append(
            f"{mode:<8}{results['median_us_per_request'][mode]:>12.1f}"
            f"{'' if overhead is None else f'{overhead:+.1f} %':>10}"
            f"{check_text:>24}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="seconds; checks the scenario runs")
    size.add_argument("--quick", action="store_true", help="6 rounds of 100 requests a mode")
    parser.add_argument("--database-url", help="an empty database (default: a SQLite file)")
    args = parser.parse_args(argv)
    results = run(args.database_url, "smoke" if args.smoke else "quick" if args.quick else "full")
    print(table(results))
    print("BENCH_AUTH_JSON " + json.dumps(results))
    return results


if __name__ == "__main__":
    main()
