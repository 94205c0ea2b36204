"""A Flask JSON provider backed by orjson: responses are serialised several times faster."""

from __future__ import annotations

from typing import Any

import orjson
from flask.json.provider import DefaultJSONProvider

# Datetimes are written by orjson itself, as ISO-8601 with their offset (naive ones, as
# psycopg reads timestamp columns, are UTC): presenters hand them over as they are.
OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_NAIVE_UTC


class OrjsonProvider(DefaultJSONProvider):
    """orjson for dumps/loads, falling back to Flask's defaults for exotic types."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj, default=self.default, option=OPTIONS).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any):
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(
            orjson.dumps(obj, default=self.default, option=OPTIONS),
            mimetype=self.mimetype,
        )


def canonical_json(obj: Any) -> str:
    """JSON as stored in JSON columns: keys sorted at every depth, no whitespace, so the same
    value always has the same text (the audit log hashes ``raw_signals`` as stored)."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()
