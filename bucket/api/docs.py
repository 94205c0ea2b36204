"""Completing the OpenAPI document with what the views' decorators cannot say.

Authentication, rate limits and body-level refusals happen in request hooks shared by many
views, so their responses are added here, once, from the same facts the hooks use.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from bucket.schemas import QuarantineReplaySchema, RequeueSchema
from bucket.web.auth import guarded_blueprints

ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}
SECURITY_SCHEMES = {
    "ConsumerToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the tokens in BUCKET_CONSUMER_TOKEN.",
    },
    "ConsumerApiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The same token, in the X-API-Key header.",
    },
}
DESCRIPTION = """\
Durable, deduplicating packet store between PRANA browsers and Karma Tracker.

Every response carries an `X-Request-ID` header (the caller's, when it sent a plain one of at most
128 characters, or a fresh one), which also appears in the service's log line for the request.
Errors share one JSON shape: `code`, `status`, `message` and, per offending field, `errors`.
When `BUCKET_CONSUMER_TOKEN` is set, the consumer and status endpoints need
`Authorization: Bearer <token>` or `X-API-Key: <token>`; ingest, the health probes and this
document stay open, and so does `/metrics` unless `BUCKET_METRICS_TOKEN` or
`BUCKET_METRICS_REQUIRE_TOKEN` is set. Ingest is rate limited in packets and bytes per client
address and in accepted packets per user (429 with `Retry-After`).
"""

# The probes and the scrape touch no session: no hook below but the token can refuse them.
OPEN_PROBES = ("/health", "/health/ready", "/metrics")
# Rules across fields that a schema checks in ``validates_schema`` and apispec cannot derive:
# which of an action's fields choose what it acts on ("all" only when sent).
CROSS_FIELD_RULES = {"Requeue": RequeueSchema, "QuarantineReplay": QuarantineReplaySchema}


def error(description: str, headers: dict | None = None) -> dict[str, Any]:
    """A response in the one error shape."""
    response: dict[str, Any] = {"description": description, "content": ERROR}
    if headers:
        response["headers"] = headers
    return response


BODY_REFUSALS = {
    "400": error("The body is empty or not JSON."),
    "413": error("The body is larger than BUCKET_MAX_BODY_BYTES."),
    "415": error("The Content-Type is neither JSON nor text/plain."),
}
AUTH_REFUSALS = {
    "401": error("No consumer token was sent."),
    "403": error("The consumer token is not valid."),
}
UNAVAILABLE = error("The database does not answer; nothing changed. Retry later.", RETRY_AFTER)
TOO_MANY = error("Too many packets from this address or for this user.", RETRY_AFTER)


def complete_packet_schemas(app: Flask, schemas: dict[str, Any]) -> None:
    """State what the schemas' fields cannot declare, each for the reason next to it."""
    packet = schemas.get("Packet")
    if packet is not None:
        # "One of user_id/employee_id, one of cognitive_state/state" is a check across fields
        # (a @validates_schema); apispec documents fields one by one, so the pairs are said here.
        # The window rule (active + idle + away = 5.0 s ± 0.1) has no JSON Schema form at all; it
        # is in the schema's description, and a request breaking it gets 422 naming
        # ``active_seconds``.
        packet["allOf"] = [
            {
                "anyOf": [
                    {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}},
                    {
                        "required": ["employee_id"],
                        "properties": {"employee_id": {"type": "string"}},
                    },
                ]
            },
            {
                "anyOf": [
                    {
                        "required": ["cognitive_state"],
                        "properties": {"cognitive_state": {"type": "string"}},
                    },
                    {"required": ["state"], "properties": {"state": {"type": "string"}}},
                ]
            },
            # A body with a ``packets`` key is read as a batch envelope (CONTRACT.md), so a
            # single packet cannot carry a field of that name.
            {"not": {"required": ["packets"]}},
        ]
        # The accepted states come from this app's BUCKET_COGNITIVE_STATES, not from the class.
        states = sorted(app.extensions["bucket.packet_rules"].cognitive_states)
        packet["properties"]["cognitive_state"]["enum"] = [*states, None]
    error = schemas.get("Error")
    if error is not None:
        # The Error component is flask-smorest's own ErrorSchema, registered by the Api object in
        # bucket.extensions, a layer below the schemas: it cannot be given a field of ours.
        error["properties"]["quarantine_id"] = {
            "type": "integer",
            "description": "A refused packet's entry in the quarantine (README, The quarantine).",
        }
    envelope = schemas.get("BatchEnvelope")
    if envelope is not None:
        # The schema takes the packets as raw items (each is validated on its own, so one bad
        # packet cannot sink the batch) and the limit is this app's BUCKET_MAX_BATCH_SIZE.
        envelope["properties"]["packets"] = {
            "type": "array",
            "items": {"$ref": "#/components/schemas/Packet"},
            "minItems": 1,
            "maxItems": app.config["BUCKET_MAX_BATCH_SIZE"],
            "description": "Each packet is validated on its own: bad ones are reported in the "
            "answer (207, or 422 when none is valid), good ones are stored.",
        }


def complete_spec(app: Flask, spec: Any) -> None:
    """Add the shared refusals, security and the cross-field packet rules to ``spec``."""
    spec.options.setdefault("info", {})["description"] = DESCRIPTION
    complete_packet_schemas(app, spec.components.schemas)
    responses = spec.components.responses
    if "UNPROCESSABLE_CONTENT" not in responses:
        # Some views name the 422 response by its RFC 9110 phrase; flask-smorest's is the older one.
        spec.components.response(
            "UNPROCESSABLE_CONTENT", error("The request is not valid: see errors per field.")
        )
    for name, schema in CROSS_FIELD_RULES.items():
        if name in spec.components.schemas:
            spec.components.schemas[name].update(schema.OPENAPI_RULE)
    secured = set(guarded_blueprints(app))
    if secured:
        for name, scheme in SECURITY_SCHEMES.items():
            if name not in spec.components.security_schemes:
                spec.components.security_scheme(name, scheme)
    for path, item in spec._paths.items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            complete_operation(path, method, operation, secured)


def complete_operation(path: str, method: str, operation: dict, secured: set[str]) -> None:
    """One operation: which hooks can refuse it decides which responses it documents
    (``secured``: the blueprints that need a token)."""
    tags = set(operation.get("tags", []))
    if tags & secured:
        operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
        for code, response in AUTH_REFUSALS.items():
            operation.setdefault("responses", {}).setdefault(code, response)
    answers = operation.setdefault("responses", {})
    if path in OPEN_PROBES:
        return
    if method in ("post", "put", "patch"):
        for code, response in BODY_REFUSALS.items():
            answers.setdefault(code, response)
    answers.setdefault("503", UNAVAILABLE)
    if "ingest" in tags:
        answers.setdefault("429", TOO_MANY)
