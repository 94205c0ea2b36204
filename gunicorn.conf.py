"""gunicorn settings: threaded workers so long polls hold a thread, not a whole worker.

Worker class and counts, and why:

- ``worker_class``: gthread, as ``bucket.web.gunicorn_worker.BufferingThreadWorker``, which reads
  each request whole (head and body, within ``BUCKET_REQUEST_READ_TIMEOUT``) in the worker's event
  loop before a thread serves it, so slow or stalled clients never hold threads. A long poll
  (``pending?wait=N``, N <= 20 s) parks one thread on an in-process condition and holds no
  database connection (each claim commits first), so the other threads of the same worker keep
  serving ingest. A sync worker would be blocked whole for
  up to 20 s per waiting consumer; gevent/eventlet would need psycopg and redis patched.
- ``workers`` = ``WEB_CONCURRENCY`` (default 2): processes for CPU parallelism and for surviving
  a crashed worker; every worker hears Redis readiness announcements, so a packet ingested by
  any worker of any instance wakes polls waiting in all of them.
- ``threads`` = ``BUCKET_THREADS`` (default 16): concurrent requests per worker. The pool size
  (``BUCKET_DB_POOL_SIZE``) defaults to the same number, so a busy thread neither waits for a
  connection nor opens a fresh one per request. Each thread holds at most one connection at a
  time; connections open on demand, so a worker keeps about as many as its peak concurrency on
  ingest's autocommit engine plus the few that polls and acks use on the other. Budget
  PostgreSQL's ``max_connections`` for ``instances × workers × (threads + a few)`` (2 × 2 × 20
  fits the default 100 with room). Karma Tracker workers each hold at most one waiting poll, so
  16 threads leave ample room.
- ``timeout = 60``: above the longest wait (20 s), so a waiting poll never looks hung.
"""

import glob
import os
import shutil
import tempfile

from config import env_int

# Empty values count as unset, as everywhere in config.py.
bind = f"0.0.0.0:{env_int('PORT', 3000)}"
# gthread: each worker serves many requests at once; a long poll (up to 20 s) parks one thread
# and no database connection, so ingest keeps flowing beside waiting consumers. Our subclass reads
# each request whole in the event loop first, so a slow client never holds a thread.
worker_class = "bucket.web.gunicorn_worker.BufferingThreadWorker"
workers = env_int("WEB_CONCURRENCY", 2)
threads = env_int("BUCKET_THREADS", 16)
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = None
# gunicorn's control socket is one path per user: several instances on one host would fight
# over it, and nothing here uses it.
control_socket_disable = True


# Prometheus multiprocess mode: every worker writes its counters to files in one directory and
# a scrape of any worker sums them. The variable must be set before a worker imports the app;
# on_starting runs in the master before any worker is forked (the app is not preloaded).
_created_metrics_dir = None


def on_starting(server):
    """Point workers at a metrics directory, emptied: old files would add to this run's figures."""
    global _created_metrics_dir
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    if not directory:
        directory = _created_metrics_dir = tempfile.mkdtemp(prefix="prana-bucket-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)


def post_worker_init(worker):
    """Start the worker's background bookkeeper (bucket/bookkeeper.py) once the app is loaded
    (not for another app served with this file, such as the benchmark's ceiling)."""
    from bucket.bookkeeper import EXTENSION_KEY
    from bucket.extensions import bookkeeper

    if EXTENSION_KEY in getattr(worker.wsgi, "extensions", {}):
        bookkeeper.start(worker.wsgi)


def child_exit(server, worker):
    """Drop a dead worker's live gauges; its counters stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics directory if this master created it."""
    if _created_metrics_dir:
        shutil.rmtree(_created_metrics_dir, ignore_errors=True)
