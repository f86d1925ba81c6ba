"""What an Endpoint declares is what its route takes (service/api/routing.py): the route
parses the query and the body its declaration names before its handler runs, so a
parameter no model has is a 400 naming it on every route — tally's own, each vendor's, and
the public ones — and the OpenAPI document, made from the same declarations, is the truth."""

from __future__ import annotations

import re

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from service.api.app import ENDPOINTS
from service.api.routing import NoQuery
from tests.factories import Org, client_pair
from tests.support import problem, uid

UNKNOWN = "shoe_size"


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: f"{e.method} {e.path}")
async def test_every_route_refuses_an_unknown_query_parameter(
    client: TestClient, pool: asyncpg.Pool, org: Org, endpoint
) -> None:
    known = (endpoint.query or NoQuery).model_fields
    assert UNKNOWN not in known and UNKNOWN not in endpoint.query_aliases
    # A key with every scope, so that nothing but the parameter is refused.
    headers = await client_pair(pool, org, ("read", "write", "admin", "ops"))
    path = re.sub(r"{\w+}", uid("x"), endpoint.path)
    resp = await client.request(endpoint.method, f"{path}?{UNKNOWN}=44", headers=headers, json={})
    body = await problem(resp, 400, UNKNOWN)
    assert [(e["in"], e["detail"]) for e in body["errors"] if e["name"] == UNKNOWN] == [
        ("query", "is not a known parameter")
    ]


async def test_a_route_without_a_query_model_takes_no_parameters(client: TestClient, org: Org) -> None:
    """Before its declaration was its behaviour, such a route ignored what it was sent: a
    misspelt filter on a single customer's route went unnoticed."""
    identifier = uid("none")
    for path in (f"/compat/flexprice/v1/customers/external/{identifier}", "/healthz"):
        resp = await client.get(path + "?expand=parent_customer", headers={"x-api-key": org.key})
        await problem(resp, 400, "expand")


async def test_the_document_lists_what_every_route_can_answer(openapi_doc: dict) -> None:
    """Errors every route like it can give are in each operation's responses, not left to
    hand-kept lists: 400 everywhere (a parameter it does not take), 413 with a body (its
    bound), 404 where the path names a customer."""
    for path, operations in openapi_doc["paths"].items():
        for method, op in operations.items():
            codes = set(op["responses"])
            assert "400" in codes, (method, path)
            assert ("413" in codes) >= ("requestBody" in op), (method, path)
            assert ("404" in codes) >= ("{" in path), (method, path)
