"""Paged listings: the page as a JSON list, the next page's URL in a ``Link`` header."""

from __future__ import annotations

from functools import cache

from flask import Response, jsonify, request, url_for
from flask_smorest import abort
from marshmallow import Schema

from bucket.exceptions import BadCursor


@cache
def query_names(schema: type[Schema]) -> frozenset[str]:
    """The query parameters a listing's schema reads (their names as sent), but its cursor."""
    fields = schema().fields.values()
    return frozenset(field.data_key or field.name for field in fields) - {"cursor"}


def page_response(
    items: list, next_cursor: str | None, endpoint: str, query: type[Schema], **view_args
) -> Response:
    """The page; with a next one, ``Link: <this URL with its cursor>; rel="next"``.

    The link keeps the caller's parameters that the listing's ``query`` schema reads, as sent,
    and nothing else: an unknown parameter would reach ``url_for``, where ``_external``,
    ``_method`` or a view argument's name changes the URL built or fails to build one.
    """
    response = jsonify(items)
    if next_cursor:
        known = query_names(query)
        kept = {name: value for name, value in request.args.items() if name in known}
        url = url_for(endpoint, **view_args, **kept, cursor=next_cursor)
        response.headers["Link"] = f'<{url}>; rel="next"'
    return response


def refuse_cursor(exc: BadCursor) -> None:
    """422 naming the ``cursor`` query parameter."""
    abort(422, message=str(exc), errors={"query": {"cursor": [str(exc)]}})
