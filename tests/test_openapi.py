"""The OpenAPI document: valid, complete, and true to what the service answers."""

import re
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from bucket.schemas import MAX_IDEMPOTENCY_KEY, IngestHeadersSchema, PacketSchema
from tests.factories import make_packet

API = "/api/v1/bucket/prana"
TOKEN = "docs-token"
AUTH = {"X-API-Key": TOKEN}
UNDOCUMENTED_ENDPOINTS = {"static", "console.console"}  # assets and the console page


@pytest.fixture
def app_config():
    return {"BUCKET_CONSUMER_TOKEN": [TOKEN]}


@pytest.fixture
def spec(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json


def resolve(spec, item):
    """Follow a local $ref (responses, schemas) to the object it names."""
    while "$ref" in item:
        node = spec
        for part in item["$ref"].lstrip("#/").split("/"):
            node = node[part]
        item = node
    return item


def assert_matches(spec, path, method, response):
    """The response's status is documented and its JSON body fits the documented schema."""
    operation = spec["paths"][path][method]
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, f"{method.upper()} {path} answered {response.status_code}"
    documented = resolve(spec, documented)
    content = documented.get("content")
    if not content:
        return
    assert response.mimetype in content, (path, response.mimetype)
    schema = content[response.mimetype]["schema"]
    if response.mimetype == "application/json":
        OAS30Validator({**schema, "components": spec["components"]}).validate(response.json)


@pytest.mark.parametrize("tokens", [[], [TOKEN]])
def test_the_document_is_valid_openapi_3(make_app, tokens):
    """The document validates as OpenAPI 3, with and without consumer auth configured."""
    document = make_app(BUCKET_CONSUMER_TOKEN=tokens).test_client().get("/openapi.json").json
    validate(document)
    assert document["openapi"].startswith("3.")


def test_every_route_is_documented_with_its_methods(app, spec):
    """Each URL rule of the app (but the docs themselves) appears with each of its methods."""
    for rule in app.url_map.iter_rules():
        if rule.endpoint in UNDOCUMENTED_ENDPOINTS or rule.endpoint.startswith("api-docs."):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)  # <path:user_id> → {user_id}
        assert path in spec["paths"], path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            operation = spec["paths"][path][method.lower()]
            assert operation.get("summary"), (path, method)
            assert "200" in operation["responses"], (path, method)


def test_security_and_refusals_are_documented(spec):
    """Protected operations declare the token and their 401/403; ingest declares 413/415/429."""
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ConsumerToken"]["scheme"] == "bearer"
    assert schemes["ConsumerApiKey"]["name"] == "X-API-Key"
    for path in (
        "/packets/pending",
        "/packets/mark-processed",
        "/packets/lease",
        "/status",
        "/quarantine",
        "/quarantine/{entry_id}",
        "/quarantine/replay",
    ):
        operation = next(iter(v for k, v in spec["paths"][API + path].items() if k != "parameters"))
        assert operation["security"] and {"401", "403"} <= set(operation["responses"])
    ingest = spec["paths"][f"{API}/ingest"]["post"]
    assert "security" not in ingest
    assert {"400", "413", "415", "422", "429", "503"} <= set(ingest["responses"])
    assert "Retry-After" in ingest["responses"]["429"]["headers"]
    assert "security" not in spec["paths"]["/health"]["get"]


def test_ingest_documents_the_headers_it_reads_and_its_outage_answer(spec):
    """Ingest's header parameters are the fields of the schema the view loads them with, and its
    503 names Retry-After like every other operation's."""
    ingest = spec["paths"][f"{API}/ingest"]["post"]
    headers = {p["name"]: p for p in ingest["parameters"] if p["in"] == "header"}
    assert set(headers) == {field.data_key for field in IngestHeadersSchema().fields.values()}
    assert headers["Idempotency-Key"]["schema"]["maxLength"] == MAX_IDEMPOTENCY_KEY
    assert "Retry-After" in resolve(spec, ingest["responses"]["503"])["headers"]


def test_real_responses_match_the_document(client, spec):
    """A walk through every endpoint, good and bad requests: each answer fits the document."""
    ingest = f"{API}/ingest"
    checks = [
        (ingest, "post", client.post(ingest, json=make_packet())),
        (ingest, "post", client.post(ingest, json={"packets": [make_packet(), make_packet()]})),
        (ingest, "post", client.post(ingest, json={"packets": [make_packet(), {"bad": 1}]})),
        (ingest, "post", client.post(ingest, json={"packets": [{"bad": 1}]})),
        (ingest, "post", client.post(ingest, json={"user_id": "x"})),
        (ingest, "post", client.post(ingest, data=b"{", content_type="application/json")),
        (ingest, "post", client.post(ingest, data=b"<x/>", content_type="application/xml")),
    ]
    pending = f"{API}/packets/pending"
    polled = client.get(f"{pending}?limit=2", headers=AUTH)
    checks += [
        (pending, "get", polled),
        (pending, "get", client.get(f"{pending}?limit=0", headers=AUTH)),
        (pending, "get", client.get(pending)),
        (pending, "get", client.get(pending, headers={"X-API-Key": "wrong"})),
    ]
    first, second = polled.json["packets"]
    ack = f"{API}/packets/mark-processed"
    lease = f"{API}/packets/lease"
    checks += [
        (
            lease,
            "post",
            client.post(
                lease,
                headers=AUTH,
                json={
                    "packet_id": second["packet_id"],
                    "receipt": second["receipt"],
                    "visibility_timeout": 30,
                },
            ),
        ),
        (
            lease,
            "post",
            client.post(
                lease,
                headers=AUTH,
                json={"packet_id": "nope", "receipt": "r", "visibility_timeout": 30},
            ),
        ),
        (
            ack,
            "post",
            client.post(
                ack,
                headers=AUTH,
                json={
                    "packet_id": first["packet_id"],
                    "success": True,
                    "karma_actions": [{"a": 1}],
                },
            ),
        ),
        (
            ack,
            "post",
            client.post(
                ack,
                headers=AUTH,
                json={
                    "results": [
                        {
                            "packet_id": second["packet_id"],
                            "success": False,
                            "error_message": "karma down",
                        },
                        {"packet_id": "unknown", "success": True},
                    ]
                },
            ),
        ),
        (ack, "post", client.post(ack, headers=AUTH, json={"packet_id": "unknown", "success": 1})),
        (
            ack,
            "post",
            client.post(ack, headers=AUTH, json={"packet_id": "unknown", "success": True}),
        ),
    ]
    user = f"{API}/packets/user/{{user_id}}"
    checks += [
        (user, "get", client.get(f"{API}/packets/user/stu_test?limit=1", headers=AUTH)),
        (user, "get", client.get(f"{API}/packets/user/stu_test?cursor=zz", headers=AUTH)),
        (f"{API}/status", "get", client.get(f"{API}/status", headers=AUTH)),
    ]
    refused = client.post(ingest, json=make_packet(focus_score=-1)).json["quarantine_id"]
    quarantine = f"{API}/quarantine"
    replay = f"{quarantine}/replay"
    checks += [
        (quarantine, "get", client.get(f"{quarantine}?limit=1", headers=AUTH)),
        (quarantine, "get", client.get(f"{quarantine}?cursor=zz", headers=AUTH)),
        (f"{quarantine}/{{entry_id}}", "get", client.get(f"{quarantine}/{refused}", headers=AUTH)),
        (f"{quarantine}/{{entry_id}}", "get", client.get(f"{quarantine}/0", headers=AUTH)),
        (replay, "post", client.post(replay, headers=AUTH, json={"ids": [refused]})),
        (replay, "post", client.post(replay, headers=AUTH, json={"user_id": "nobody"})),
        (replay, "post", client.post(replay, headers=AUTH, json={"ids": []})),
        ("/health", "get", client.get("/health")),
        ("/health/ready", "get", client.get("/health/ready")),
        ("/metrics", "get", client.get("/metrics")),
    ]
    for path, method, response in checks:
        assert response.status_code < 500, (path, response.json)
        assert_matches(spec, path, method, response)


def test_the_docs_page_serves_swagger_ui_for_the_document(client):
    """/docs is an HTML page pointing at /openapi.json (its assets load in a browser only)."""
    response = client.get("/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert "/openapi.json" in response.get_data(as_text=True)


class AssetLinks(HTMLParser):
    """The ``src``/``href`` of a page's scripts, stylesheets and images, with their kind."""

    def __init__(self):
        super().__init__()
        self.assets: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and attrs.get("src"):
            self.assets.append(("script", attrs["src"]))
        elif tag == "link" and attrs.get("href"):
            self.assets.append(("link", attrs["href"]))
        elif tag == "img" and attrs.get("src"):
            self.assets.append(("img", attrs["src"]))


ASSET_TYPES = {"script": ("javascript",), "link": ("css", "image/"), "img": ("image/",)}


def assert_served(client, url, kinds, min_bytes=100):
    """``url`` answers 200 with a content type naming one of ``kinds`` and a real body."""
    with client.get(url) as response:
        assert response.status_code == 200, url
        assert any(kind in response.mimetype for kind in kinds), (url, response.mimetype)
        assert len(response.get_data()) >= min_bytes, url


def test_the_docs_page_loads_its_assets_from_the_service_itself(client):
    """/docs works offline: no script, stylesheet or image comes from another host, and each
    asset it names is served here (the vendored Swagger UI in bucket/static/vendor/)."""
    page = AssetLinks()
    page.feed(client.get("/docs").get_data(as_text=True))
    kinds = {kind for kind, _ in page.assets}
    assert {"script", "link"} <= kinds, page.assets
    for kind, url in page.assets:
        assert urlsplit(url).netloc == "" and urlsplit(url).scheme == "", url
        assert url.startswith("/static/vendor/swagger-ui/"), url
        assert_served(client, url, ASSET_TYPES[kind], min_bytes=10_000)


def test_chart_js_is_served_from_the_vendored_copy(client):
    """Chart.js's UMD build is served by the service, for pages that draw charts offline."""
    assert_served(client, "/static/vendor/chartjs/chart.umd.min.js", ("javascript",), 100_000)


offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    zone=st.none() | st.just(UTC) | offsets,
    space=st.booleans(),
)
def test_service_accepts_a_timestamp_exactly_when_the_document_does(moment, zone, space):
    """The published ``date-time`` + ``pattern`` and the service's parser agree on every value,
    from year 1 to 9999 with any offset (the range where UTC conversion used to overflow)."""
    from bucket.timeutil import TIMESTAMP_PATTERN

    text = moment.replace(tzinfo=zone).isoformat(sep=" " if space else "T")
    documented = re.match(TIMESTAMP_PATTERN, text) is not None
    try:
        PacketSchema().load(make_packet(timestamp=text))
        accepted = True
    except ValidationError as exc:
        assert set(exc.messages) == {"timestamp"}, exc.messages
        accepted = False
    assert accepted == documented, text


def test_the_document_publishes_the_timestamp_rule_the_service_enforces(spec):
    """The Packet schema's timestamp carries the service's own pattern (one rule, two readers)."""
    from bucket.timeutil import TIMESTAMP_PATTERN

    timestamp = spec["components"]["schemas"]["Packet"]["properties"]["timestamp"]
    assert timestamp["format"] == "date-time"
    assert timestamp["pattern"] == TIMESTAMP_PATTERN
