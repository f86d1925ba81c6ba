"""The four compatibility route sets together, against their vendors' docs (Respan, Devdraft,
Flexprice, SnapRefund): the timestamp formats the examples use, isolation between
organizations on every route set, and the OpenAPI document's tags and parameters.

Each route set's own tests are in test_compat_respan.py (Respan), test_compat_v0.py
(Devdraft), test_compat_flexprice.py (Flexprice) and test_compat_public.py (SnapRefund);
what they share is in compatkit.py."""

from __future__ import annotations

import asyncpg
from aiohttp.test_utils import TestClient

from service.api.compat import flexprice, public, respan, v0
from tests.compatkit import (
    FLEXPRICE_LIST,
    ISO_MS,
    ISO_Z,
    PUBLIC_LIST,
    RESPAN_LIST,
    RESPAN_LIST_EXAMPLE,
    RESPAN_USER,
    V0_LIST,
    get_json,
)
from tests.factories import Org, client_pair, insert_customer


def test_the_timestamp_patterns_are_the_examples_own() -> None:
    """The format checks below are the vendors' formats (and tell them apart)."""
    for stamp in ("2025-10-15T08:00:00Z", "2025-12-29T10:30:00Z", "2024-01-15T10:30:00Z"):
        assert ISO_Z.match(stamp) and not ISO_MS.match(stamp)
    for stamp in ("2024-01-01T00:00:00.000Z", "2023-12-01T00:00:00.000Z"):
        assert ISO_MS.match(stamp) and not ISO_Z.match(stamp)
    # Respan's list id is customer_identifier + environment + organization id.
    ex = RESPAN_LIST_EXAMPLE["results"][0]
    assert ex["id"] == ex["customer_identifier"] + ex["environment"] + ex["unique_organization_id"]


# =============================================================================================
# Every route set: isolation between organizations, and the OpenAPI document.


async def test_no_route_set_shows_another_organizations_customers(
    client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    mine = [await insert_customer(pool, org, f"user_{i}") for i in range(3)]
    theirs = await insert_customer(pool, other_org, "user_0")  # the same identifier, elsewhere
    mine_ids = {str(r["id"]) for r in mine}
    for o, expect, absent in ((org, mine_ids, {str(theirs["id"])}), (other_org, {str(theirs["id"])}, mine_ids)):
        pair = await client_pair(pool, o)
        seen = {
            "respan": {
                r["unique_organization_id"] + r["customer_identifier"]
                for r in (await get_json(client, RESPAN_LIST, o.headers()))["results"]
            },
            "v0": {c["id"] for c in (await get_json(client, V0_LIST, pair))["customers"]},
            "flexprice": {i["id"] for i in (await get_json(client, FLEXPRICE_LIST, o.headers()))["items"]},
            "public": {c["id"] for c in (await get_json(client, PUBLIC_LIST, o.headers()))["data"]},
        }
        assert seen["respan"] == {str(o.id) + f"user_{i}" for i in range(len(expect))}
        for name in ("v0", "flexprice", "public"):
            assert seen[name] == expect and not seen[name] & absent, name
    detail = await get_json(client, RESPAN_USER.format("user_0"), other_org.headers())
    assert detail["organization_name"] == other_org.name and detail["id"] == "user_0"


EXPECTED_OPERATIONS = {
    respan.TAG: {
        ("get", "/compat/respan/api/users/list/"),
        ("post", "/compat/respan/api/users/list/"),
        ("get", "/compat/respan/api/users/{customer_identifier}/"),
        ("patch", "/compat/respan/api/users/{customer_identifier}/"),
        ("delete", "/compat/respan/api/users/{customer_identifier}/"),
    },
    v0.TAG: {("get", "/compat/v0/api/v0/customers")},
    flexprice.TAG: {
        ("get", "/compat/flexprice/v1/customers"),
        ("post", "/compat/flexprice/v1/customers"),
        ("put", "/compat/flexprice/v1/customers"),
        ("post", "/compat/flexprice/v1/customers/search"),
        ("get", "/compat/flexprice/v1/customers/{id}"),
        ("delete", "/compat/flexprice/v1/customers/{id}"),
        ("get", "/compat/flexprice/v1/customers/external/{external_id}"),
    },
    public.TAG: {("get", "/compat/public/api/public/customers")},
}


async def test_every_compat_route_set_has_its_own_tag(openapi_doc: dict) -> None:
    tags = [t["name"] for t in openapi_doc["tags"]]
    assert len(set(EXPECTED_OPERATIONS)) == 4
    for tag, expected in EXPECTED_OPERATIONS.items():
        assert tags.count(tag) == 1, tag
        assert next(t for t in openapi_doc["tags"] if t["name"] == tag)["description"]
        tagged = {
            (method, path)
            for path, ops in openapi_doc["paths"].items()
            for method, op in ops.items()
            if tag in op["tags"]
        }
        assert tagged == expected, tag
        for method, path in expected:
            assert openapi_doc["paths"][path][method]["tags"] == [tag]
    # Every /compat path belongs to one of them, and no canonical path does.
    for path, ops in openapi_doc["paths"].items():
        for op in ops.values():
            assert (path.startswith("/compat/")) == bool(set(op["tags"]) & set(EXPECTED_OPERATIONS)), path
    # The documented query parameters are the vendors' own names.
    params = {
        path: {p["name"] for p in openapi_doc["paths"][path]["get"].get("parameters", []) if p["in"] == "query"}
        for path in (RESPAN_LIST, V0_LIST, FLEXPRICE_LIST, PUBLIC_LIST)
    }
    assert params[RESPAN_LIST] == {"page", "page_size", "sort_by", "environment", "filters"}
    assert params[V0_LIST] == {"skip", "take", "status", "name", "email"}
    assert params[FLEXPRICE_LIST] == {
        "limit",
        "offset",
        "sort",
        "order",
        "status",
        "customer_ids",
        "external_ids",
        "external_id",
        "email",
        "parent_customer_ids",
        "expand",
    }
    assert params[PUBLIC_LIST] == {"limit", "offset", "include_subscriptions"}
