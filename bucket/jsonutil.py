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


# orjson encodes at most 254 levels (and parses at most 1024). Values stored as JSON, and the
# answers that wrap them, stay below SAFE_DEPTH; BUCKET_MAX_JSON_DEPTH may not exceed
# MAX_DEPTH_LIMIT, which leaves room for the wrapping (a packet, a list of entries, an answer).
SAFE_DEPTH = 200
MAX_DEPTH_LIMIT = 128


def deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` levels (a scalar is 0, ``{}`` or ``[]`` is 1);
    iterative, and it stops at the first branch past the limit."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > limit:
            return True
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return False


class _Raw(str):
    """Text already encoded, pushed on the encoder's stack."""


def json_text_any_depth(value: Any) -> str:
    """JSON text of a parsed value however deep it nests (the encoders stop at 254 levels):
    for keeping what an attacker sent, never for what the service serves."""
    parts: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Raw):
            parts.append(item)
        elif isinstance(item, dict):
            stack.append(_Raw("}"))
            for index, (key, child) in enumerate(reversed(list(item.items()))):
                stack.append(child)
                stack.append(_Raw(orjson.dumps(str(key)).decode() + ":"))
                if index < len(item) - 1:
                    stack.append(_Raw(","))
            stack.append(_Raw("{"))
        elif isinstance(item, list):
            stack.append(_Raw("]"))
            for index, child in enumerate(reversed(item)):
                stack.append(child)
                if index < len(item) - 1:
                    stack.append(_Raw(","))
            stack.append(_Raw("["))
        else:
            parts.append(orjson.dumps(item, option=orjson.OPT_NON_STR_KEYS).decode())
    return "".join(parts)


# raw_signals on PostgreSQL since migration 0020 (bucket/services/signals.py): a key set of a
# dictionary and the values' canonical JSON texts in key order, joined by this character,
# which JSON text never holds unescaped (control characters are escaped inside strings).
SIGNAL_SEPARATOR = "\x1f"


def signals_template(keys: tuple[str, ...] | list[str]) -> str:
    """The canonical JSON text of an object with ``keys`` (sorted, plain: nothing to escape,
    no ``%``), each value a ``%s`` placeholder, as PostgreSQL's ``format()`` fills it."""
    return "{" + ",".join(f'"{key}":%s' for key in keys) + "}"


def expand_signals(keys: tuple[str, ...] | list[str], values: str) -> str:
    """The canonical JSON text of the signals stored as ``keys`` and ``values``: the very
    text ``canonical_json`` gave for the whole object."""
    return signals_template(keys) % tuple(values.split(SIGNAL_SEPARATOR))
