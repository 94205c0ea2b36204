"""Fuzzing every operation of the OpenAPI document with schemathesis, against the WSGI app.

Schemathesis generates valid and invalid inputs (bodies, query strings, path parameters,
headers) from the document and checks each answer: never a 5xx, status codes, content types,
headers and bodies as documented, invalid input refused, valid input accepted. No network: the
requests go straight to the Flask app. The number of examples is bounded to keep CI fast.

The examples come from a fixed seed, so every run sends the same requests and a failure is
reproduced by running the test again. ``BUCKET_TEST_FUZZ_SEED`` picks another seed
(``random`` draws one); a failure always names the seed that found it.
"""

import copy
import math
import os
import random

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings

TOKEN = "fuzz-consumer-token"
MAX_EXAMPLES = int(os.environ.get("BUCKET_TEST_FUZZ_EXAMPLES", "40"))
DEFAULT_SEED = 20261201
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def fuzz_seed() -> int:
    """The seed of this run: fixed unless ``BUCKET_TEST_FUZZ_SEED`` says otherwise."""
    chosen = os.environ.get("BUCKET_TEST_FUZZ_SEED", "").strip()
    if chosen == "random":
        return random.SystemRandom().getrandbits(64)
    return int(chosen) if chosen else DEFAULT_SEED


@pytest.fixture
def app_config():
    """Token and rate limits on, as in production, so their refusals are fuzzed too."""
    # The future limit on a packet's timestamp (BUCKET_MAX_CLOCK_SKEW) follows the clock, so
    # no schema can state it: lifted here, tested in tests/test_ingest_auth.py.
    return {
        "BUCKET_CONSUMER_TOKEN": [TOKEN],
        "BUCKET_RATE_LIMIT_ENABLED": True,
        "BUCKET_MAX_CLOCK_SKEW": 10**12,
    }


def map_query(context, query):
    """Cap long polls at a tenth of a second (the fuzzer tests shapes, not waiting), and drop
    invented paging cursors: a cursor is opaque, valid only as issued in a Link header."""
    if not isinstance(query, dict):
        return query
    wait = query.get("wait")
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and 0 <= wait <= 20:
        query["wait"] = min(wait, 0.1)
    query.pop("cursor", None)
    return query


WINDOW = ("active_seconds", "idle_seconds", "away_seconds")


def fit_window(packet):
    """Scale a packet's three non-negative durations to sum to 5 s, the rule no schema states."""
    if not isinstance(packet, dict):
        return
    parts = [packet.get(name) for name in WINDOW]
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts):
        return
    if not all(0 <= p and math.isfinite(p) for p in parts):
        return
    largest = max(parts)
    if largest == 0:
        packet.update(zip(WINDOW, (5.0, 0.0, 0.0), strict=True))
        return
    shares = [part / largest for part in parts]  # no overflow near the float maximum
    total = sum(shares)
    packet.update((name, share * 5.0 / total) for name, share in zip(WINDOW, shares, strict=True))


def fit_body(case):
    """Apply the window rule to a generated ingest body (one packet or a batch), in place."""
    if not case.operation.path.endswith("/ingest"):
        return
    body = copy.deepcopy(case.body)
    if isinstance(body, dict) and isinstance(body.get("packets"), list):
        for packet in body["packets"]:
            fit_window(packet)
    else:
        fit_window(body)
    case.body = body


def fuzz_operation(operation, run_seed: int) -> int:
    """Run the bounded examples of one operation; return how many were sent."""
    sent = 0

    @seed(run_seed)
    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case):
        nonlocal sent
        sent += 1
        fit_body(case)
        case.call_and_validate(headers=AUTH)

    run()
    return sent


def test_every_operation_survives_generated_input(app, capsys):
    """No 5xx and no answer that breaks the document, for good and bad input alike."""
    config = schemathesis.Config.from_dict(
        # NUL characters are refused by design (PostgreSQL text cannot hold them).
        {"generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "allow-x00": False}}
    )
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app, config=config)
    schema.hook(map_query)
    run_seed = fuzz_seed()
    failures, counts = {}, {}
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            counts[operation.label] = fuzz_operation(operation, run_seed)
        except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - report them all at once
            failures[operation.label] = f"{type(exc).__name__}: {exc}"
    with capsys.disabled():
        total = sum(counts.values())
        print(
            f"\nfuzzed {len(counts) + len(failures)} operations, {total} examples "
            f"(seed {run_seed}): {counts}"
        )
    assert len(counts) + len(failures) >= 9
    reproduce = f"reproduce with BUCKET_TEST_FUZZ_SEED={run_seed} pytest {__file__}"
    assert not failures, (
        reproduce + "\n\n" + "\n\n".join(f"{label}\n{text}" for label, text in failures.items())
    )
