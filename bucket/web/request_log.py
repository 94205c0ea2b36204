"""One JSON log line per request, and a request id that the caller gets back."""

from __future__ import annotations

import logging
import os
import re
import time

import orjson
from flask import Flask, current_app, g, request

log = logging.getLogger("bucket.request")
# Attributes every LogRecord has; anything else on a record came in through ``extra``.
STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

REQUEST_ID_HEADER = "X-Request-ID"
# A caller's id is echoed only when it is short and plain: nothing that could forge log lines.
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, any traceback.

    Hand-rolled on orjson because it runs once per request: several times cheaper than a
    general-purpose JSON formatter.
    """

    _second: tuple[int, str] = (-1, "")

    def format_time(self, created: float) -> str:
        """ISO 8601 in UTC with milliseconds; strftime runs once a second, not once a line
        (it was a third of the formatter's time)."""
        whole = int(created)
        second, text = self._second
        if second != whole:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            self._second = (whole, text)  # one tuple: threads see it whole or not at all
        return f"{text}.{int((created - whole) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.format_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in STANDARD_ATTRIBUTES:
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def json_formatter() -> logging.Formatter:
    """The formatter of the service's log lines."""
    return JsonLineFormatter()


def configure_logging(app: Flask) -> None:
    """Log to stderr (JSON unless LOG_FORMAT=text) when nothing configured logging before us."""
    root = logging.getLogger()
    if root.handlers:  # gunicorn --log-config, pytest, an embedding application: theirs wins
        return
    handler = logging.StreamHandler()
    if (app.config.get("LOG_FORMAT") or "json").lower() == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(app.config.get("LOG_LEVEL") or "INFO")


def start_request() -> None:
    """Stamp the start time and the request id (the caller's, or a fresh one)."""
    g.request_started = time.perf_counter()
    incoming = request.headers.get(REQUEST_ID_HEADER)
    if incoming and VALID_REQUEST_ID.fullmatch(incoming):
        g.request_id = incoming
    else:
        g.request_id = os.urandom(8).hex()


def finish_request(response):
    """Echo the request id and write the request's log line (no bodies, no headers, no query)."""
    request_id = g.get("request_id")
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    if current_app.config.get("BUCKET_REQUEST_LOG", True) and log.isEnabledFor(logging.INFO):
        started = g.get("request_started")
        fields = {
            "method": request.method,
            "path": request.path,
            "endpoint": request.endpoint,
            "status": response.status_code,
            "duration_ms": None
            if started is None
            else round((time.perf_counter() - started) * 1000, 2),
            "request_id": request_id,
            "client": request.remote_addr,
        }
        packets = g.get("packet_counts")
        if packets:
            fields["packets"] = packets
        # makeRecord + handle: what log.info does, minus the stack walk that finds the caller.
        log.handle(
            log.makeRecord(log.name, logging.INFO, __name__, 0, "request", None, None, extra=fields)
        )
    return response


def init_request_log(app: Flask) -> None:
    """Register the hooks first, so even requests refused by auth or limits are logged."""
    app.before_request(start_request)
    app.after_request(finish_request)
