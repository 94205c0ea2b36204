"""gunicorn settings: threaded workers so long polls hold a thread, not a whole worker."""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '3000')}"
# gthread: each worker serves many requests at once; a long poll (up to 20 s) parks one thread
# and no database connection, so ingest keeps flowing beside waiting consumers.
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("BUCKET_THREADS", "16"))
timeout = 60
graceful_timeout = 30
keepalive = 5
accesslog = None
