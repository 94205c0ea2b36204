"""No forks: two instances × two workers ingest at full speed while the sealer runs in every
worker; at the end there is one chain of seals, every packet is in exactly one, and
``flask bucket verify`` finds nothing wrong.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
import uuid

import psycopg
import pytest
import requests

from tests.cluster import Instance, flask_command, fresh_database_env
from tests.concurrency import join_all, wait_until
from tests.factories import make_packet

pytestmark = pytest.mark.slow
API = "/api/v1/bucket/prana"
SECONDS = float(os.environ.get("BUCKET_TEST_AUDIT_SECONDS", "60"))
CLIENTS = 6
BATCH = 20


def test_sealers_in_every_worker_of_two_instances_make_one_chain():
    with contextlib.ExitStack() as cleanup:
        url, env = cleanup.enter_context(
            fresh_database_env(
                "audit",
                BUCKET_AUDIT_SEAL_INTERVAL="0.3",
                BUCKET_BOOKKEEPING_INTERVAL="0.1",
                BUCKET_AUDIT_SEAL_MAX_PACKETS="2000",
            )
        )
        instances = []
        for _ in range(2):
            instance = Instance(env, workers=2)
            cleanup.callback(instance.stop)
            instances.append(instance.start())

        stored: list[str] = []
        failures: list[str] = []
        lock = threading.Lock()
        deadline = time.monotonic() + SECONDS

        def ingest(n: int) -> None:
            session = requests.Session()
            for round_ in itertools.count():
                if time.monotonic() > deadline:
                    return
                target = instances[(n + round_) % 2]
                packets = [make_packet(user_id=f"audit-{n}") for _ in range(BATCH)]
                try:
                    answer = session.post(
                        f"{target.url}{API}/ingest", json={"packets": packets}, timeout=10
                    )
                    results = answer.json()["results"]
                except (requests.RequestException, ValueError, KeyError) as exc:
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    stored.extend(r["packet_id"] for r in results if r["status"] == "ingested")

        clients = [threading.Thread(target=ingest, args=(n,), daemon=True) for n in range(CLIENTS)]
        for client in clients:
            client.start()
        join_all(clients, SECONDS + 30, "ingest client")
        assert not failures, failures[:5]

        def all_sealed() -> bool:
            head = requests.get(f"{instances[0].url}/api/v1/bucket/latest-hash", timeout=10)
            return head.json()["packets_sealed"] == len(stored)

        wait_until(all_sealed, 60, "every stored packet sealed by the workers", interval=0.5)
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
            seals = conn.execute(
                "SELECT seq, after_seq, last_seq, packet_count FROM audit_seals ORDER BY seq"
            ).fetchall()
            leaves = [
                (str(uuid.UUID(bytes=uuids[i : i + 16])),)
                for (uuids,) in conn.execute("SELECT leaf_uuids FROM audit_seals")
                for i in range(0, len(uuids), 16)
            ]
        assert [s[0] for s in seals] == list(range(1, len(seals) + 1)), "a gap or a fork"
        assert all(s[1] == previous[2] for previous, s in itertools.pairwise(seals))
        assert sorted(p for (p,) in leaves) == sorted(stored), "a packet sealed twice or never"
        assert sum(s[3] for s in seals) == len(stored)
        assert len(seals) > 10, "the sealers should have taken turns many times"
        verified = flask_command(env, "bucket", "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        print(
            f"\n{len(stored)} packets ingested in {SECONDS:.0f} s by 2 instances x 2 workers, "
            f"{len(seals)} seals, verify clean"
        )
