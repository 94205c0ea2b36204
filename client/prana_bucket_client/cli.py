"""The consumer command: Karma Tracker's ``__main__``, reading the same environment variables.

    prana-bucket-consumer --consumer karma_tracker.bucket_consumer:BucketConsumer

The class (``--consumer`` or ``CONSUMER_CLASS``) is Karma Tracker's subclass of
:class:`~prana_bucket_client.BucketConsumer`. Karma Tracker may also keep its own
``if __name__ == "__main__": raise SystemExit(main(consumer_class=BucketConsumer))``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Mapping

from prana_bucket_client.karma import BucketConsumer

# name: (help, default); the first four are the deployed consumer's own.
ENVIRONMENT = {
    "BUCKET_API_BASE_URL": ("the bucket", "http://localhost:3000"),
    "KARMA_TRACKER_API_BASE_URL": ("the karma API (unset: the bucket's URL)", None),
    "POLL_INTERVAL_SECONDS": ("pace of an empty or failing bucket", "5"),
    "BATCH_SIZE": ("packets per poll at most", "10"),
    "BUCKET_CONSUMER_TOKEN": ("the bucket's consumer token", None),
    "CONSUMER_CONCURRENCY": ("packets processed at once", "16"),
    "CONSUMER_MAX_IN_FLIGHT": ("packets leased at most (default: concurrency)", None),
    "CONSUMER_VISIBILITY_TIMEOUT": ("lease seconds, renewed while processing", "60"),
    "CONSUMER_WAIT_SECONDS": ("long-poll seconds (0-20)", "10"),
    "CONSUMER_SHUTDOWN_SECONDS": ("seconds a stop gives running packets", "30"),
    "CONSUMER_CLASS": ("module:Class of the consumer to run", None),
    "LOG_LEVEL": ("logging level", "INFO"),
}


def load_class(spec: str) -> type[BucketConsumer]:
    """``package.module:Class`` → the class."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"--consumer must look like module:Class, not {spec!r}")
    sys.path.insert(0, os.getcwd())
    target = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not (isinstance(target, type) and issubclass(target, BucketConsumer)):
        raise SystemExit(f"{spec} is not a subclass of prana_bucket_client.BucketConsumer")
    return target


def build(consumer_class: type[BucketConsumer], env: Mapping[str, str]) -> BucketConsumer:
    """The consumer configured from ``env`` (the variables in ``ENVIRONMENT``)."""

    def get(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or ENVIRONMENT[name][1]

    max_in_flight = get("CONSUMER_MAX_IN_FLIGHT")
    return consumer_class(
        bucket_url=get("BUCKET_API_BASE_URL") or "http://localhost:3000",
        karma_tracker_url=get("KARMA_TRACKER_API_BASE_URL"),
        poll_interval=float(get("POLL_INTERVAL_SECONDS") or 5),
        batch_size=int(get("BATCH_SIZE") or 10),
        token=get("BUCKET_CONSUMER_TOKEN"),
        concurrency=int(get("CONSUMER_CONCURRENCY") or 16),
        max_in_flight=int(max_in_flight) if max_in_flight else None,
        visibility_timeout=int(get("CONSUMER_VISIBILITY_TIMEOUT") or 60),
        wait=float(get("CONSUMER_WAIT_SECONDS") or 10),
        shutdown_timeout=float(get("CONSUMER_SHUTDOWN_SECONDS") or 30),
    )


def main(argv: list[str] | None = None, consumer_class: type[BucketConsumer] | None = None) -> int:
    """Run a consumer until SIGTERM or SIGINT; exit 0 after a clean stop."""
    epilog = "environment:\n" + "\n".join(
        f"  {name:28} {text} (default {default})" for name, (text, default) in ENVIRONMENT.items()
    )
    parser = argparse.ArgumentParser(
        prog="prana-bucket-consumer",
        description="Consume PRANA packets from the bucket for Karma Tracker.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--consumer", help="module:Class of the consumer (or CONSUMER_CLASS)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if consumer_class is None:
        spec = args.consumer or os.environ.get("CONSUMER_CLASS", "").strip()
        if not spec:
            parser.error("name the consumer class: --consumer module:Class or CONSUMER_CLASS")
        consumer_class = load_class(spec)
    consumer = build(consumer_class, os.environ)
    logging.getLogger("prana_bucket_client").info(
        "bucket %s, karma API %s, batch size %s, concurrency %s",
        consumer.bucket_url,
        consumer.karma_tracker_url,
        consumer.batch_size,
        consumer.concurrency,
    )
    consumer.start_consumer()
    return 0
