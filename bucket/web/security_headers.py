"""Headers every answer carries against framing, sniffing and injected content, and routing
redirects answered in the error shape instead of Werkzeug's HTML."""

from __future__ import annotations

import base64
import hashlib
import re
from http import HTTPStatus
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, request
from orjson import dumps

# JSON, static files, anything but the two pages: nothing may load, run or frame it.
API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# The console loads its own script, style and vendored Chart.js, and calls the API: only 'self'.
CONSOLE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)
PAGES = {"/console": "console", "/docs": "docs"}


def docs_policy(body: bytes) -> str:
    """Swagger UI's page: its assets (vendored, or BUCKET_SWAGGER_UI_URL's origin), the inline
    script that starts it by hash, and the inline styles Swagger UI sets."""
    assets = "'self'"
    parts = urlsplit(current_app.config.get("OPENAPI_SWAGGER_UI_URL") or "")
    if parts.scheme and parts.netloc:
        assets += f" {parts.scheme}://{parts.netloc}"
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode() + "'"
        for script in INLINE_SCRIPT.findall(body)
    )
    return (
        f"default-src 'none'; script-src {assets} {hashes}; "
        f"style-src {assets} 'unsafe-inline'; img-src {assets} data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )


def add_security_headers(response: Response) -> Response:
    """CSP (with frame-ancestors), X-Frame-Options and nosniff on every answer."""
    page = PAGES.get(request.path) if response.mimetype == "text/html" else None
    if page == "console":
        policy = CONSOLE_POLICY
    elif page == "docs" and not response.direct_passthrough:
        policy = docs_policy(response.get_data())
    else:
        policy = API_POLICY
    response.headers["Content-Security-Policy"] = policy
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def redirect_as_json(response: Response) -> Response:
    """Routing's redirects (``prana//status`` → ``prana/status``, a missing trailing slash) keep
    their status and a relative Location, with a body in the error shape instead of HTML."""
    if 300 <= response.status_code < 400 and response.mimetype == "text/html":
        # Relative: the client's Host header must not choose where a redirect points.
        parts = urlsplit(response.headers.get("Location", ""))
        location = parts.path + (f"?{parts.query}" if parts.query else "")
        response.headers["Location"] = location
        response.autocorrect_location_header = False
        code = response.status_code
        body = {
            "code": code,
            "status": HTTPStatus(code).phrase,
            "message": f"This resource is at {location}.",
            "location": location,
        }
        response.set_data(dumps(body))
        response.mimetype = "application/json"
    return response


def init_security_headers(app: Flask) -> None:
    """Install the hooks (they run for error answers too)."""
    app.after_request(redirect_as_json)
    app.after_request(add_security_headers)
