"""The OpenAPI document describes the application as it really is; /docs, /healthz, /readyz."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from service.api.models import ListParams, RetrieveParams, UsageParams
from tests.factories import Org, insert_customer
from tests.schemacheck import check
from tests.support import ok_json, problem, uid

# ---------------------------------------------------------------------------------------------
# The schema checker (tests/schemacheck.py) itself.


def test_the_checker_catches_mistakes() -> None:
    doc = {
        "components": {
            "schemas": {"T": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}
        }
    }
    ref = {"$ref": "#/components/schemas/T"}
    check({"a": 1}, ref, doc)
    for bad in ({}, {"a": "1"}, {"a": 1, "b": 2}, [], None, {"a": True}):
        with pytest.raises(AssertionError):
            check(bad, ref, doc)
    with pytest.raises(AssertionError):
        check("nope", {"type": "string", "format": "uuid"}, doc)
    with pytest.raises(AssertionError):
        check(None, {"anyOf": [{"type": "string"}, {"type": "integer"}]}, doc)


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def openapi(client: TestClient) -> dict[str, Any]:
    resp = await client.get("/openapi.json")
    return await ok_json(resp)


def operation(doc: dict, method: str, path: str) -> dict[str, Any]:
    return doc["paths"][path][method.lower()]


def response_schema(doc: dict, method: str, path: str, status: int, content_type: str = "application/json") -> dict:
    return operation(doc, method, path)["responses"][str(status)]["content"][content_type]["schema"]


# Not API operations: the redirect from / to the docs, and the docs page's own static files.
NOT_OPERATIONS = {("GET", "/"), ("GET", "/docs-assets")}


def registered_routes(client: TestClient) -> set[tuple[str, str]]:
    routes = set()
    for route in client.app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter") or route.resource.canonical
        routes.add((route.method, path))
    return routes - NOT_OPERATIONS


async def test_document_is_openapi_3_1(openapi: dict) -> None:
    assert openapi["openapi"].startswith("3.1")
    assert openapi["info"]["title"] and openapi["info"]["version"]
    assert openapi["paths"]
    schemes = openapi["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    assert {schemes["clientKey"]["name"], schemes["clientSecret"]["name"]} == {"x-client-key", "x-client-secret"}


async def test_document_describes_every_registered_route(client: TestClient, openapi: dict) -> None:
    documented = {(method.upper(), path) for path, ops in openapi["paths"].items() for method in ops}
    registered = registered_routes(client)
    assert registered, "no routes?"
    assert registered - documented == set(), "routes missing from /openapi.json"
    assert documented - registered == set(), "documented routes that do not exist"
    for canonical in [
        ("GET", "/v1/customers"),
        ("POST", "/v1/customers"),
        ("GET", "/v1/customers/{customer_identifier}"),
        ("PATCH", "/v1/customers/{customer_identifier}"),
        ("DELETE", "/v1/customers/{customer_identifier}"),
        ("GET", "/v1/customers/{customer_identifier}/usage"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
    ]:
        assert canonical in documented


async def test_every_operation_is_complete(openapi: dict) -> None:
    operation_ids = []
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            operation_ids.append(op["operationId"])
            assert op["summary"] and op["tags"]
            assert any(code.startswith("2") for code in op["responses"]), (method, path)
            for code, response in op["responses"].items():
                assert response["description"]
                if code.startswith(("4", "5")):
                    assert list(response["content"]) == ["application/problem+json"], (method, path, code)
                    check_ref = response["content"]["application/problem+json"]["schema"]
                    assert check_ref["$ref"].endswith("/Problem")
            for name in re.findall(r"{(\w+)}", path):
                assert any(p["in"] == "path" and p["name"] == name and p["required"] for p in op["parameters"])
            if "x-required-scope" in op:
                assert op["security"]
                assert "401" in op["responses"] and "403" in op["responses"], (method, path)
            if "requestBody" in op:
                assert "400" in op["responses"]
    assert len(operation_ids) == len(set(operation_ids)), "operationId must be unique"


@pytest.mark.parametrize(
    "method, path, model",
    [
        ("GET", "/v1/customers", ListParams),
        ("GET", "/v1/customers/{customer_identifier}", RetrieveParams),
        ("PATCH", "/v1/customers/{customer_identifier}", RetrieveParams),
        ("DELETE", "/v1/customers/{customer_identifier}", RetrieveParams),
        ("GET", "/v1/customers/{customer_identifier}/usage", UsageParams),
    ],
)
async def test_query_parameters_are_documented(openapi: dict, method: str, path: str, model) -> None:
    params = {p["name"]: p for p in operation(openapi, method, path)["parameters"] if p["in"] == "query"}
    expected = {info.alias or name for name, info in model.model_fields.items()}
    assert set(params) == expected
    if model is ListParams:
        assert params["metadata"]["style"] == "deepObject"
        assert params["status"]["style"] == "form" and params["status"]["explode"] is True
        assert params["limit"]["schema"]["anyOf"][0]["maximum"] == 1000
    if model is UsageParams:
        # Optional: without them the series covers the last 30 days.
        assert not params["from"]["required"] and not params["to"]["required"]


async def test_scopes_in_the_document_are_enforced(client: TestClient, openapi: dict, org: Org) -> None:
    """Every documented scope is what the route really demands (and public routes need none)."""
    checked = 0
    for path, ops in openapi["paths"].items():
        concrete = re.sub(r"{\w+}", uid("scope"), path)
        for method, op in ops.items():
            body = {} if "requestBody" in op else None
            scope = op.get("x-required-scope")
            anonymous = await client.request(method.upper(), concrete, json=body)
            if scope is None:
                assert anonymous.status not in (401, 403), (method, path)
                continue
            checked += 1
            await problem(anonymous, 401)
            assert anonymous.headers["WWW-Authenticate"]
            read = await client.request(method.upper(), concrete, json=body, headers=org.headers(org.read_key))
            if scope == "read":
                assert read.status not in (401, 403), (method, path, read.status)
            else:
                await problem(read, 403)
            full = await client.request(method.upper(), concrete, json=body, headers=org.headers())
            if scope in ("read", "write"):
                assert full.status not in (401, 403), (method, path, full.status)
            else:
                await problem(full, 403)
    assert checked >= 6


# ---------------------------------------------------------------------------------------------
# Real responses against the document's schemas.


@pytest.fixture
async def family(pool: asyncpg.Pool, org: Org) -> tuple[Org, dict, dict]:
    parent = await insert_customer(
        pool,
        org,
        uid("parent"),
        name="Parent",
        total_cost=Decimal("1.5"),
        first_seen=datetime(2026, 1, 1, tzinfo=UTC),
        latency_sum=2.0,
        latency_count=4,
        total_budget=Decimal("10"),
        budget_duration="weekly",
        metadata={"k": [1, {"x": None}]},
    )
    child = await insert_customer(pool, org, uid("child"), parent_customer_id=parent["id"], email="c@example.com")
    await pool.execute(
        "INSERT INTO subscriptions (organization_id, id, customer_id, status, plan_stripe_price_id, plan_name,"
        " plan_amount, plan_currency, plan_interval, current_period_start, source_time)"
        " VALUES ($1, $2, $3, 'trialing', 'price_1', 'Pro', 4999, 'usd', 'month', now(), now())",
        org.id,
        uid("sub"),
        child["id"],
    )
    await pool.execute(
        "INSERT INTO subscriptions (organization_id, id, customer_id, status, source_time)"
        " VALUES ($1, $2, $3, 'active', now())",
        org.id,
        uid("sub"),
        child["id"],
    )
    await pool.execute(
        "INSERT INTO daily_usage (organization_id, customer_id, day, requests, cost, latency_sum, latency_count)"
        " VALUES ($1, $2, '2026-01-02', 3, 0.75, 1.5, 3)",
        org.id,
        child["id"],
    )
    return org, parent, child


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?expand=parent_customer",
        "?include=subscriptions",
        "?expand=parent_customer&include=subscriptions&limit=1",
        "?limit=1&offset=1",
        "?page=1&page_size=1",
    ],
)
async def test_list_responses_match_the_document(client: TestClient, openapi: dict, family, query: str) -> None:
    org, _, _ = family
    body = await ok_json(await client.get("/v1/customers" + query, headers=org.headers()))
    check(body, response_schema(openapi, "GET", "/v1/customers", 200), openapi)
    if body["next_cursor"]:
        nxt = await ok_json(await client.get(f"/v1/customers?cursor={body['next_cursor']}", headers=org.headers()))
        check(nxt, response_schema(openapi, "GET", "/v1/customers", 200), openapi)


async def test_single_customer_responses_match_the_document(client: TestClient, openapi: dict, family) -> None:
    org, parent, child = family
    one = "/v1/customers/{customer_identifier}"
    for ident in (parent["customer_identifier"], child["customer_identifier"]):
        for query in ("", "?expand=parent_customer&include=subscriptions"):
            body = await ok_json(await client.get(f"/v1/customers/{ident}{query}", headers=org.headers()))
            check(body, response_schema(openapi, "GET", one, 200), openapi)
    created = await client.post(
        "/v1/customers",
        json={"customer_identifier": uid(), "name": "n", "total_budget": 5, "address": {"city": "Oslo"}},
        headers=org.headers(),
    )
    check(await ok_json(created, 201), response_schema(openapi, "POST", "/v1/customers", 201), openapi)
    patched = await client.patch(
        f"/v1/customers/{child['customer_identifier']}", json={"budget_duration": "daily"}, headers=org.headers()
    )
    check(await ok_json(patched), response_schema(openapi, "PATCH", one, 200), openapi)
    usage = await client.get(
        f"/v1/customers/{child['customer_identifier']}/usage?from=2026-01-01&to=2026-01-03", headers=org.headers()
    )
    body = await ok_json(usage)
    check(body, response_schema(openapi, "GET", one + "/usage", 200), openapi)
    assert [p["requests"] for p in body["results"]] == [0, 3, 0]
    deleted = await client.delete(f"/v1/customers/{child['customer_identifier']}", headers=org.headers())
    assert deleted.status == 204 and "204" in operation(openapi, "DELETE", one)["responses"]


async def test_problem_responses_match_the_document(client: TestClient, openapi: dict, org: Org) -> None:
    cases = [
        (await client.get("/v1/customers?limit=0&bogus=1", headers=org.headers()), 400, ("GET", "/v1/customers")),
        (await client.get("/v1/customers"), 401, ("GET", "/v1/customers")),
        (
            await client.post("/v1/customers", json={}, headers=org.headers(org.read_key)),
            403,
            ("POST", "/v1/customers"),
        ),
        (
            await client.get(f"/v1/customers/{uid()}", headers=org.headers()),
            404,
            ("GET", "/v1/customers/{customer_identifier}"),
        ),
        (
            await client.post(
                "/v1/customers", json={"customer_identifier": uid(), "total_cost": 1}, headers=org.headers()
            ),
            400,
            ("POST", "/v1/customers"),
        ),
    ]
    for resp, status, (method, path) in cases:
        body = await problem(resp, status)
        check(body, response_schema(openapi, method, path, status, "application/problem+json"), openapi)


# ---------------------------------------------------------------------------------------------
# /docs, /healthz, /readyz


async def test_docs_page(client: TestClient, openapi: dict) -> None:
    """Swagger UI, its scripts served by tally (relative URLs: no CDN), reading this document.
    That it renders every operation is tests/test_docs.py's browser test."""
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    text = await resp.text()
    assert text.lstrip().lower().startswith("<!doctype html")
    assert 'url: "openapi.json"' in text
    scripts = re.findall(r'<script src="([^"]+)"', text)
    assert scripts and all(src.startswith("docs-assets/") for src in scripts), scripts


async def test_healthz(client: TestClient, openapi: dict) -> None:
    body = await ok_json(await client.get("/healthz"))
    assert body["status"] == "ok"
    check(body, response_schema(openapi, "GET", "/healthz", 200), openapi)


async def test_readyz(client: TestClient, openapi: dict) -> None:
    body = await ok_json(await client.get("/readyz"))
    assert body["status"] == "ok"
    assert body["checks"]["database"] == "ok"
    check(body, response_schema(openapi, "GET", "/readyz", 200), openapi)


async def test_responses_carry_a_request_id(client: TestClient) -> None:
    resp = await client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["X-Request-ID"])
