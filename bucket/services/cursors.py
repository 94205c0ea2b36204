"""Opaque keyset cursors: the last row of a page, as base64url JSON, refused unless ours.

Every paged listing (a user's packets, the dead letters, the quarantine) names its next page
this way; each says which values its cursor holds and how to check them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, TypeVar

from bucket.exceptions import BadCursor

T = TypeVar("T")
MESSAGE = "The cursor is not valid; use the Link header of a previous page."
# Every cursor we write is far shorter (a timestamp and a packet id: about 110 characters); a
# longer one is refused before it is decoded.
MAX_LENGTH = 512


def encode(*values: Any) -> str:
    """A cursor holding ``values`` (JSON-serialisable)."""
    raw = json.dumps(list(values)).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, parse: Callable[..., T]) -> T:
    """``parse(*values)`` of a cursor ``encode`` made; ``BadCursor`` for anything else
    (``parse`` raises ValueError or TypeError for values it refuses)."""
    if len(cursor) > MAX_LENGTH:
        raise BadCursor(MESSAGE)
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(values, list):
            raise ValueError("not a cursor")
        return parse(*values)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the parser's stack (never one of ours).
        raise BadCursor(MESSAGE) from exc
