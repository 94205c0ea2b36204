"""The building blocks every schema uses: unknown fields tolerated, strict numbers, text
without NUL, client timestamps."""

from __future__ import annotations

import math
from datetime import UTC
from typing import Any

from marshmallow import (
    EXCLUDE,
    Schema,
    fields,
    validate,
)

from bucket.timeutil import TIMESTAMP_RULE, parse_client_timestamp


class BaseSchema(Schema):
    """Unknown fields are tolerated everywhere: clients add transport fields we do not own."""

    class Meta:
        unknown = EXCLUDE


class StrictNumber(fields.Float):
    """A finite JSON number: strings, booleans, NaN and infinities are refused."""

    default_error_messages = {"invalid": "Not a valid number.", "special": "Not a finite number."}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        if not math.isfinite(value):
            raise self.make_error("special")
        return float(value)


class Text(fields.String):
    """A string without NUL characters: PostgreSQL text cannot hold them, so refuse them here."""

    default_error_messages = {"nul": "Must not contain NUL characters."}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise self.make_error("nul")
        return text


class ClientTimestamp(fields.Field):
    """An ISO-8601 timestamp string, normalised to aware UTC."""

    default_error_messages = {"invalid": f"Not {TIMESTAMP_RULE}."}

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any):
        if not isinstance(value, str):
            raise self.make_error("invalid")
        try:
            return parse_client_timestamp(value)
        except (ValueError, OverflowError) as exc:  # year 1 or 9999 with an offset overflows UTC
            raise self.make_error("invalid") from exc

    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any):
        return None if value is None else value.isoformat()


class Moment(fields.AwareDateTime):
    """An ISO-8601 moment with a time zone (``since``/``until``), normalised to UTC.

    A moment that UTC cannot hold (year 1 with a positive offset, year 9999 with a negative
    one) is refused here, naming its parameter, instead of overflowing in the database driver.
    """

    default_error_messages = {"overflow": "Not a moment that UTC can hold (years 1 to 9999)."}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(default_timezone=None, **kwargs)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any):
        moment = super()._deserialize(value, attr, data, **kwargs)
        try:
            return moment.astimezone(UTC)
        except OverflowError as exc:
            raise self.make_error("overflow") from exc


def identifier(required: bool = False) -> fields.String:
    """A 1–256 character identifier, nullable unless required."""
    return Text(
        required=required, allow_none=not required, validate=validate.Length(min=1, max=256)
    )
