"""The Flexprice route set (/compat/flexprice) against Flexprice's API reference (Customers): the
example request replayed and its response held to the doc's example field by field, the
pagination flow, sorts, status mapping, filters, expand, bounds, authentication and
environments.

Where Flexprice's docs are silent the adapter's module docstring is the contract (named where used)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.api.app import create_app
from service.infra.settings import Settings
from tests.compatkit import (
    CROWD_SIZE,
    FLEXPRICE_EXAMPLE,
    FLEXPRICE_LIST,
    FLEXPRICE_SEARCH,
    ISO_Z,
    UTC,
    Crowd,
    assert_like,
    get_json,
    newest_first,
    parse_z,
    response_schema,
)
from tests.factories import Org, insert_customer, set_columns
from tests.schemacheck import check as check_schema
from tests.support import lagging_standby, ok_json, problem, uid


async def _flexprice_example(pool: asyncpg.Pool, org: Org) -> list[dict[str, Any]]:
    rows = []
    for item in FLEXPRICE_EXAMPLE["items"]:
        row = await insert_customer(
            pool, org, item["external_id"], name=item["name"], email=item["email"], metadata=item["metadata"]
        )
        rows.append(
            await set_columns(
                pool,
                row,
                **{k: item[k] for k in item if k.startswith("address_")},
                created_at=parse_z(item["created_at"]),
                updated_at=parse_z(item["updated_at"]),
            )
        )
    return rows


def flexprice_expected(org: Org, example_item: dict[str, Any], row: dict[str, Any], environment: str = "prod") -> dict:
    """The example's item as tally maps it: id is the customer uuid, environment_id the
    environment, tenant_id the organization id (adapter docstring)."""
    return {**example_item, "id": str(row["id"]), "environment_id": environment, "tenant_id": str(org.id)}


async def test_flexprice_replays_the_docs_example(
    client: TestClient, pool: asyncpg.Pool, org: Org, openapi_doc: dict
) -> None:
    rows = await _flexprice_example(pool, org)
    body = await get_json(client, f"{FLEXPRICE_LIST}?limit=10&offset=0&order=desc", org.headers())
    check_schema(body, response_schema(openapi_doc, "GET", FLEXPRICE_LIST), openapi_doc)
    assert_like(body, FLEXPRICE_EXAMPLE)
    assert body == {
        "items": [
            flexprice_expected(org, item, row) for item, row in zip(FLEXPRICE_EXAMPLE["items"], rows, strict=True)
        ],
        "pagination": FLEXPRICE_EXAMPLE["pagination"],
    }
    for item in body["items"]:
        assert ISO_Z.match(item["created_at"]) and ISO_Z.match(item["updated_at"])
    # The defaults (limit 50, offset 0, created_at desc) give the same items.
    default = await get_json(client, FLEXPRICE_LIST, org.headers())
    assert default == {**body, "pagination": {"total": 2, "limit": 50, "offset": 0}}


async def test_flexprice_pagination_flow_of_the_docs(client: TestClient, crowd: Crowd) -> None:
    org, rows = crowd
    walked: list[str] = []
    for offset in (0, 50, 100):  # the doc's three pages
        body = await get_json(client, f"{FLEXPRICE_LIST}?limit=50&offset={offset}", org.headers())
        assert body["pagination"] == {"total": CROWD_SIZE, "limit": 50, "offset": offset}
        assert len(body["items"]) == 50
        walked += [item["id"] for item in body["items"]]
    assert walked == [str(r["id"]) for r in newest_first(rows)]  # everything, once, newest first
    end = await get_json(client, f"{FLEXPRICE_LIST}?limit=50&offset=150", org.headers())
    assert end == {"items": [], "pagination": {"total": CROWD_SIZE, "limit": 50, "offset": 150}}
    # An odd page size walks the same sequence.
    walked = []
    for offset in range(0, CROWD_SIZE, 11):
        walked += [
            i["id"]
            for i in (await get_json(client, f"{FLEXPRICE_LIST}?limit=11&offset={offset}", org.headers()))["items"]
        ]
    assert walked == [str(r["id"]) for r in newest_first(rows)]
    one = await get_json(client, f"{FLEXPRICE_LIST}?limit=1000", org.headers())
    assert len(one["items"]) == CROWD_SIZE


async def test_flexprice_sort_and_order(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    rows = []
    for i, (name, email) in enumerate(
        [("delta", "b@x.io"), ("alpha", "d@x.io"), (None, "a@x.io"), ("charlie", None), ("bravo", "c@x.io")]
    ):
        row = await insert_customer(pool, org, f"ext_{'pqrst'[(i * 2) % 5]}", name=name, email=email)
        rows.append(await set_columns(pool, row, created_at=datetime(2024, 1, 10 + (i * 3) % 5, tzinfo=UTC)))

    def order(field: str, descending: bool) -> list[str]:
        return [str(r["id"]) for r in sorted(rows, key=lambda r: (r[field] or "", r["id"]), reverse=descending)]

    async def listed(query: str) -> list[str]:
        return [i["id"] for i in (await get_json(client, f"{FLEXPRICE_LIST}?{query}", org.headers()))["items"]]

    assert await listed("") == order("created_at", True)  # default: created_at, desc
    assert await listed("order=asc") == order("created_at", False)
    for field in ("created_at", "name", "email"):  # the doc's examples
        for direction in ("asc", "desc"):
            assert await listed(f"sort={field}&order={direction}") == order(field, direction == "desc"), field
    assert await listed("sort=external_id&order=asc") == order("customer_identifier", False)
    for query, name in [
        ("order=ascending", "order"),
        ("order=DESC", "order"),
        ("sort=shoe_size", "sort"),
        ("sort=-name", "sort"),
        ("sort_by=name", "sort_by"),
    ]:
        await problem(await client.get(f"{FLEXPRICE_LIST}?{query}", headers=org.headers()), 400, name)


async def test_flexprice_status_mapping(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    rows = {
        s: await insert_customer(pool, org, uid(s), status=s)
        for s in ("active", "draft", "archived", "blacklisted", "deactivated")
    }
    body = await get_json(client, FLEXPRICE_LIST, org.headers())
    for item in body["items"]:  # bare customers: every string of the example is still a string ("")
        assert_like(item, FLEXPRICE_EXAMPLE["items"][0])
        assert (item["name"], item["email"], item["address_line1"], item["metadata"]) == ("", "", "", {})
    shown = {i["id"]: i["status"] for i in body["items"]}
    # Only Flexprice's own statuses are shown: each of tally's as its nearest.
    assert shown == {
        str(rows["active"]["id"]): "published",
        str(rows["draft"]["id"]): "published",
        str(rows["archived"]["id"]): "archived",
        str(rows["blacklisted"]["id"]): "archived",
        str(rows["deactivated"]["id"]): "archived",
    }
    # Filtering maps back to the same sets; "deleted" is a status tally never holds: no customers.
    for flex, tallys in (
        ("published", ("active", "draft")),
        ("draft", ("draft",)),
        ("archived", ("archived", "blacklisted", "deactivated")),
        ("deleted", ()),
    ):
        body = await get_json(client, f"{FLEXPRICE_LIST}?status={flex}", org.headers())
        assert sorted(i["id"] for i in body["items"]) == sorted(str(rows[t]["id"]) for t in tallys), flex
        assert body["pagination"]["total"] == len(tallys)
        searched = await ok_json(
            await client.post(FLEXPRICE_SEARCH, json={"status": flex}, headers={"x-api-key": org.key})
        )
        assert searched == body, flex
    for bad in ("active", "PUBLISHED", "blacklisted"):
        await problem(await client.get(f"{FLEXPRICE_LIST}?status={bad}", headers=org.headers()), 400, "status")


async def test_flexprice_filters(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    parent_a = await insert_customer(pool, org, "parent_a")
    parent_b = await insert_customer(pool, org, "parent_b")
    rows = {
        "a1": await insert_customer(pool, org, "user_a1", email="a1@example.com", parent_customer_id=parent_a["id"]),
        "a2": await insert_customer(pool, org, "user_a2", email="a2@example.com", parent_customer_id=parent_a["id"]),
        "b1": await insert_customer(pool, org, "user_b1", email="b1@example.com", parent_customer_id=parent_b["id"]),
        "solo": await insert_customer(pool, org, "user,solo", email="solo@example.com"),
        "parent_a": parent_a,
        "parent_b": parent_b,
    }

    async def who(query: str) -> set[str]:
        body = await get_json(client, f"{FLEXPRICE_LIST}?{query}", org.headers())
        assert body["pagination"]["total"] == len(body["items"])
        found = {i["id"] for i in body["items"]}
        return {k for k, r in rows.items() if str(r["id"]) in found}

    assert await who(f"customer_ids={rows['a1']['id']},{rows['b1']['id']}") == {"a1", "b1"}
    assert await who(f"customer_ids={rows['a1']['id']}&customer_ids={rows['solo']['id']}") == {"a1", "solo"}
    assert await who("external_ids=user_a1,user_a2,no_such_user") == {"a1", "a2"}
    assert await who("external_id=user_b1") == {"b1"}
    assert await who("external_id=user,solo") == {"solo"}  # a single id is taken whole
    assert await who("email=a2@example.com") == {"a2"}
    assert await who(f"parent_customer_ids={parent_a['id']}") == {"a1", "a2"}
    assert await who(f"parent_customer_ids={parent_a['id']},{parent_b['id']}") == {"a1", "a2", "b1"}
    assert await who(f"parent_customer_ids={parent_b['id']}&external_ids=user_a1,user_b1") == {"b1"}
    assert await who(f"customer_ids={uuid.uuid4()}") == set()
    for query, name in [
        ("customer_ids=not-a-uuid", "customer_ids"),
        ("parent_customer_ids=42", "parent_customer_ids"),
        ("external_id=", "external_id"),
        ("tenant_id=x", "tenant_id"),
    ]:
        await problem(await client.get(f"{FLEXPRICE_LIST}?{query}", headers=org.headers()), 400, name)


async def test_flexprice_expand_parent_customer(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    parent_row = await insert_customer(
        pool, org, "user_12345", name="Acme Corporation", email="billing@acme.com", metadata={"plan_tier": "enterprise"}
    )
    parent_row = await set_columns(
        pool,
        parent_row,
        created_at=datetime(2024, 1, 15, 10, 30, tzinfo=UTC),
        updated_at=datetime(2024, 1, 15, 10, 30, tzinfo=UTC),
        **{k: v for k, v in FLEXPRICE_EXAMPLE["items"][0].items() if k.startswith("address_")},
    )
    child = await insert_customer(
        pool, org, "user_child", name="Acme EMEA", parent_customer_id=parent_row["id"], status="draft"
    )
    child = await set_columns(pool, child, created_at=datetime(2024, 2, 1, tzinfo=UTC))
    body = await get_json(client, f"{FLEXPRICE_LIST}?expand=parent_customer", org.headers())
    items = {i["external_id"]: i for i in body["items"]}
    parent_item = flexprice_expected(org, FLEXPRICE_EXAMPLE["items"][0], parent_row)
    assert items["user_12345"] == {**parent_item, "parent_customer": None}
    assert items["user_child"]["parent_customer_id"] == str(parent_row["id"])
    assert items["user_child"]["parent_customer"] == parent_item  # the parent, in the same shape
    assert items["user_child"]["status"] == "published"  # tally's draft
    assert_like(
        items["user_child"],
        {**FLEXPRICE_EXAMPLE["items"][0], "parent_customer": FLEXPRICE_EXAMPLE["items"][0]},
        also={"parent_customer_id": {"string"}},
    )
    # Flexprice's strings are never null: what tally lacks (the child's e-mail and address) is "".
    missing = (
        "email",
        "address_line1",
        "address_line2",
        "address_city",
        "address_state",
        "address_postal_code",
        "address_country",
    )
    assert {k: items["user_child"][k] for k in missing} == dict.fromkeys(missing, "")
    # Without expand there is no parent_customer key at all.
    plain = await get_json(client, FLEXPRICE_LIST, org.headers())
    assert all(set(i) == set(FLEXPRICE_EXAMPLE["items"][0]) for i in plain["items"])
    await problem(await client.get(f"{FLEXPRICE_LIST}?expand=children", headers=org.headers()), 400, "expand")


@pytest.mark.parametrize(
    "query, name",
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=many", "limit"),
        ("offset=-1", "offset"),
        ("offset=x", "offset"),
    ],
)
async def test_flexprice_refuses_bad_bounds(client: TestClient, org: Org, query: str, name: str) -> None:
    await problem(await client.get(f"{FLEXPRICE_LIST}?{query}", headers=org.headers()), 400, name)


async def test_flexprice_authentication_and_environment(
    client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    prod = await insert_customer(pool, org, uid("prod"))
    test = await insert_customer(pool, org, uid("test"), environment="test")
    for headers in ({}, {"Authorization": "Bearer nope"}):
        await problem(await client.get(FLEXPRICE_LIST, headers=headers), 401)
    ids = [i["id"] for i in (await get_json(client, FLEXPRICE_LIST, org.headers()))["items"]]
    assert ids == [str(prod["id"])]
    body = await get_json(client, FLEXPRICE_LIST, org.headers(org.test_key))
    assert [(i["id"], i["environment_id"]) for i in body["items"]] == [(str(test["id"]), "test")]
    theirs = await get_json(client, FLEXPRICE_LIST, other_org.headers())
    assert theirs == {"items": [], "pagination": {"total": 0, "limit": 50, "offset": 0}}
    theirs = await get_json(client, f"{FLEXPRICE_LIST}?customer_ids={prod['id']}", other_org.headers())
    assert theirs["items"] == []


# ---- what Flexprice's SDKs send: x-api-key, search, get, update, delete ------------------------

FLEXPRICE_ONE = "/compat/flexprice/v1/customers/{}"


async def test_flexprice_takes_the_key_as_x_api_key(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    row = await insert_customer(pool, org, uid("key"))
    body = await get_json(client, FLEXPRICE_LIST, {"x-api-key": org.key})
    assert [i["id"] for i in body["items"]] == [str(row["id"])]
    assert (await get_json(client, FLEXPRICE_LIST, {"x-api-key": org.test_key}))["items"] == []  # its environment
    for bad in ("", "tly_nope.nope", org.key.partition(".")[0] + ".wrong"):
        await problem(await client.get(FLEXPRICE_LIST, headers={"x-api-key": bad}), 401)
    # Only this route set reads the header: elsewhere a key goes where that API expects it.
    await problem(await client.get("/compat/respan/api/users/list/", headers={"x-api-key": org.key}), 401)
    await problem(await client.get("/v1/customers", headers={"x-api-key": org.key}), 401)


async def test_flexprice_metadata_is_a_map_of_strings(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    metadata = {"plan": "pro", "beta": True, "seats": 5, "ratio": 0.5, "none": None, "tags": ["a"], "nested": {"a": 1}}
    row = await insert_customer(pool, org, uid("meta"), metadata=metadata)
    expected = {
        "plan": "pro",
        "beta": "true",
        "seats": "5",
        "ratio": "0.5",
        "none": "null",
        "tags": '["a"]',
        "nested": '{"a": 1}',
    }
    body = await get_json(client, FLEXPRICE_LIST, org.headers())
    assert body["items"][0]["metadata"] == expected
    one = await get_json(client, FLEXPRICE_ONE.format(row["id"]), org.headers())
    assert one["metadata"] == expected


async def test_flexprice_search(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    rows = []
    for i, (name, email, meta) in enumerate(
        [("Acme", "a@acme.dev", {"tier": "pro"}), ("Beta_1", "b@beta.io", {"tier": "free"}), ("Gamma", None, {})]
    ):
        row = await insert_customer(pool, org, f"s{i}", name=name, email=email, metadata=meta)
        rows.append(await set_columns(pool, row, created_at=base + timedelta(days=i)))
    headers = {"x-api-key": org.key}

    async def search(body: dict) -> list[str]:
        found = await ok_json(await client.post(FLEXPRICE_SEARCH, json=body, headers=headers))
        assert found["pagination"]["total"] >= len(found["items"])
        return [i["external_id"] for i in found["items"]]

    assert await search({}) == ["s2", "s1", "s0"]  # newest first, as the list
    assert await search({"order": "asc"}) == ["s0", "s1", "s2"]
    assert await search({"sort": [{"field": "name", "direction": "asc"}]}) == ["s0", "s1", "s2"]
    assert await search({"sort": [{"field": "external_id", "direction": "desc"}], "limit": 1, "offset": 1}) == ["s1"]
    assert await search({"external_ids": ["s0", "s2"], "order": "asc"}) == ["s0", "s2"]
    assert await search({"external_id": "s1"}) == ["s1"]
    assert await search({"customer_ids": [str(rows[0]["id"])]}) == ["s0"]
    assert await search({"email": "B@BETA.IO"}) == ["s1"]
    assert await search({"metadata": {"tier": "pro"}}) == ["s0"]
    assert await search({"start_time": "2025-01-02T00:00:00Z", "order": "asc"}) == ["s1", "s2"]
    assert await search({"end_time": "2025-01-02T00:00:00Z", "order": "asc"}) == ["s0", "s1"]
    cond = {"field": "name", "operator": "contains", "data_type": "string", "value": {"string": "_1"}}
    assert await search({"filters": [cond]}) == ["s1"]  # "_" is no wildcard
    cond = {"field": "external_id", "operator": "in", "data_type": "array", "value": {"array": ["s0", "s1"]}}
    assert await search({"filters": [cond], "order": "asc"}) == ["s0", "s1"]
    cond = {"field": "created_at", "operator": "before", "data_type": "date", "value": {"date": "2025-01-02"}}
    assert await search({"filters": [cond]}) == ["s0"]
    bad = [
        ({"sort": [{"field": "shoe_size"}]}, "sort.0.field"),
        ({"sort": [{"field": "name"}, {"field": "email"}]}, "sort"),
        ({"limit": 0}, "limit"),
        ({"status": "active"}, "status"),
        ({"filters": [{"field": "tenant_id", "value": {"string": "x"}}]}, "filters.0"),
        ({"filters": [{"field": "name", "operator": "like", "value": {"string": "x"}}]}, "filters.0"),
        ({"filters": [{"field": "name", "value": {"boolean": True}}]}, "filters.0"),
        ({"filters": [{"field": "name", "operator": "contains", "value": {}}]}, "filters.0"),
        ({"filters": [{"field": "created_at", "operator": "after", "value": {"date": "soon"}}]}, "filters.0"),
        ({"start_time": "yesterday"}, "start_time"),
        ({"shoe_size": 44}, "shoe_size"),
    ]
    for body, name in bad:
        await problem(await client.post(FLEXPRICE_SEARCH, json=body, headers=headers), 400, name)


async def test_flexprice_get_update_delete(client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org) -> None:
    row = await insert_customer(pool, org, uid("one"), name="Old", metadata={"beta": True})
    headers = {"x-api-key": org.key}
    one = await get_json(client, FLEXPRICE_ONE.format(row["id"]), headers)
    assert (one["external_id"], one["name"], one["metadata"]) == (row["customer_identifier"], "Old", {"beta": "true"})
    assert await get_json(client, FLEXPRICE_ONE.format("external/" + row["customer_identifier"]), headers) == one
    for missing in (uuid.uuid4(), "cust_abc"):
        await problem(await client.get(FLEXPRICE_ONE.format(missing), headers=headers), 404)
    await problem(await client.get(FLEXPRICE_ONE.format(row["id"]), headers={"x-api-key": other_org.key}), 404)
    # PUT by id or by external id, through the canonical write path.
    put = {"name": "New", "contact": "+33 1", "address_city": "Lyon", "metadata": {"tier": "pro"}}
    resp = await client.put(FLEXPRICE_LIST, params={"id": str(row["id"])}, json=put, headers=headers)
    updated = await ok_json(resp)
    assert (updated["name"], updated["address_city"], updated["metadata"]) == ("New", "Lyon", {"tier": "pro"})
    stored = await pool.fetchrow("SELECT phone, metadata FROM customers WHERE id = $1", row["id"])
    assert stored["phone"] == "+33 1"
    by_external = {"external_customer_id": row["customer_identifier"]}
    resp = await client.put(FLEXPRICE_LIST, params=by_external, json={"email": "x@y.io"}, headers=headers)
    assert (await ok_json(resp))["email"] == "x@y.io"
    bad = [
        ({}, {"name": "x"}, "id"),
        ({"id": str(row["id"]), "external_customer_id": "other"}, {"name": "x"}, "external_customer_id"),
        ({"id": str(row["id"])}, {"external_id": "renamed"}, "external_id"),
        ({"id": str(row["id"])}, {"timezone": "UTC"}, "timezone"),
        ({"id": str(row["id"])}, {"billing_currency": "usd"}, "billing_currency"),
        ({"id": str(row["id"])}, {"email": "not-an-email"}, "email"),
        ({"id": str(row["id"])}, {"metadata": {"a": 1}}, "metadata.a"),
    ]
    for params, body, name in bad:
        await problem(await client.put(FLEXPRICE_LIST, params=params, json=body, headers=headers), 400, name)
    await problem(await client.put(FLEXPRICE_LIST, params={"id": str(uuid.uuid4())}, json={}, headers=headers), 404)
    # DELETE by id: gone, then 404.
    resp = await client.delete(FLEXPRICE_ONE.format(row["id"]), headers=headers)
    assert resp.status == 204
    await problem(await client.get(FLEXPRICE_ONE.format(row["id"]), headers=headers), 404)
    await problem(await client.delete(FLEXPRICE_ONE.format(row["id"]), headers=headers), 404)


async def test_flexprice_writes_by_id_find_the_customer_on_the_primary(
    settings: Settings, pool: asyncpg.Pool, org: Org
) -> None:
    """PUT and DELETE by id find the customer in the write's own transaction, on the primary:
    a read standby that has not replayed the customer's creation yet (reads miss it) neither
    hides it from them nor lets another customer take its place between finding and writing."""
    row = await insert_customer(pool, org, uid("lagging"), name="Before")
    one = FLEXPRICE_ONE.format(row["id"])
    headers = {"x-api-key": org.key}
    async with lagging_standby(settings.migrations_dir) as read_url:
        app = create_app(settings.model_copy(update={"database_read_url": read_url}))
        async with TestClient(TestServer(app)) as client:
            await problem(await client.get(one, headers=headers), 404)  # a read: the standby's
            mismatch = {"id": str(row["id"]), "external_customer_id": "someone_else"}
            resp = await client.put(FLEXPRICE_LIST, params=mismatch, json={"name": "Other"}, headers=headers)
            await problem(resp, 400, "external_customer_id")
            assert await pool.fetchval("SELECT name FROM customers WHERE id = $1", row["id"]) == "Before"
            resp = await client.put(
                FLEXPRICE_LIST, params={"id": str(row["id"])}, json={"name": "After"}, headers=headers
            )
            assert (await ok_json(resp))["name"] == "After"
            assert await pool.fetchval("SELECT name FROM customers WHERE id = $1", row["id"]) == "After"
            assert (await client.delete(one, headers=headers)).status == 204
            await problem(await client.delete(one, headers=headers), 404)
    assert await pool.fetchval("SELECT count(*) FROM customers WHERE id = $1", row["id"]) == 0
