"""Paged listings: the page as a JSON list, the next page's URL in a ``Link`` header."""

from __future__ import annotations

from flask import Response, jsonify, request, url_for
from flask_smorest import abort

from bucket.exceptions import BadCursor


def page_response(items: list, next_cursor: str | None, endpoint: str, **view_args) -> Response:
    """The page; with a next one, ``Link: <this URL with its cursor>; rel="next"`` (the
    caller's other query parameters kept)."""
    response = jsonify(items)
    if next_cursor:
        query = {k: v for k, v in request.args.items() if k != "cursor"}
        url = url_for(endpoint, cursor=next_cursor, **view_args, **query)
        response.headers["Link"] = f'<{url}>; rel="next"'
    return response


def refuse_cursor(exc: BadCursor) -> None:
    """422 naming the ``cursor`` query parameter."""
    abort(422, message=str(exc), errors={"query": {"cursor": [str(exc)]}})
