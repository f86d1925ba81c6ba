"""The Respan route set (/compat/respan) against Respan's API reference, Users: List customers
and one customer (Retrieve, Update, Delete a customer).

Each page's example requests are replayed as written there (query strings and headers, with
tally's base URL), and each response is held to the doc's example field by field: the same
set of keys, the same JSON kind for every value, the doc's timestamp format, and values
mapped from a stored customer whose every field is known. Then the bounds, error codes,
sorts, pagination walks and cross-organization isolation the pages list.

Where Respan's docs are silent the adapter's module docstring is the contract (named where used)."""

from __future__ import annotations

import base64
import copy
import dataclasses
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from tests.compatkit import (
    ANY_LINK,
    CROWD_SIZE,
    ISO_Z,
    RESPAN_DETAIL_EXAMPLE,
    RESPAN_LIST,
    RESPAN_LIST_EXAMPLE,
    RESPAN_USER,
    UTC,
    Crowd,
    assert_like,
    by_first_seen_desc,
    get_json,
    kind,
    parse_z,
    response_schema,
    z,
)
from tests.factories import Org, add_daily_cost, add_subscription, insert_customer, set_columns
from tests.schemacheck import check as check_schema
from tests.support import follow, ok_json, problem, rel, uid


async def _respan_example_user(pool: asyncpg.Pool, org: Org) -> dict[str, Any]:
    """The customer of Respan's List and Retrieve examples, every field as the examples show it."""
    row = await insert_customer(
        pool,
        org,
        "user_123",
        name="John Doe",
        email="john@example.com",
        first_seen=datetime(2025, 10, 15, 8, 0, tzinfo=UTC),
        last_active=datetime(2025, 12, 29, 10, 30, tzinfo=UTC),
        active_days=75,
        number_of_requests=15420,
        prompt_tokens=120000,
        completion_tokens=50000,
        total_tokens=170000,
        total_cost=Decimal("523.45"),
        latency_sum=2.46,
        latency_count=2,
        ttft_sum=0.9,
        ttft_count=2,
        total_budget=Decimal("1000"),
        period_budget=Decimal("100"),
        budget_duration="monthly",
    )
    return await set_columns(pool, row, updated_at=datetime(2025, 12, 29, 10, 30, tzinfo=UTC))


async def test_respan_list_replays_the_docs_example(
    client: TestClient, pool: asyncpg.Pool, org: Org, openapi_doc: dict
) -> None:
    user = await _respan_example_user(pool, org)
    others = []
    for i in range(50):  # 51 customers in all, as in the example's count
        others.append(
            await insert_customer(
                pool,
                org,
                f"user_{i:03d}",
                name=f"User {i}",
                email=f"user{i}@example.com",
                first_seen=None if i % 10 == 0 else datetime(2025, 10, 1, tzinfo=UTC) - timedelta(hours=i),
                last_active=datetime(2025, 10, 2, tzinfo=UTC),
                active_days=i,
                number_of_requests=i * 3,
                total_tokens=i * 100,
                total_cost=Decimal(i) / 4,
            )
        )
    await insert_customer(pool, org, "user_test_env", environment="test")  # other environment: not listed

    query = "?page=1&page_size=50&sort_by=-first_seen&environment=prod"
    body = await get_json(client, RESPAN_LIST + query, org.headers())
    check_schema(body, response_schema(openapi_doc, "GET", RESPAN_LIST), openapi_doc)
    assert_like(
        body,
        RESPAN_LIST_EXAMPLE,
        also={
            "previous": {"string"},
            "next": {"null"},
            # tally has no latency/ttft/name/e-mail/first use for some customers
            "average_latency": {"null"},
            "average_ttft": {"null"},
            "first_seen": {"null"},
            "name": {"null"},
            "email": {"null"},
        },
    )
    assert body["count"] == 51 and len(body["results"]) == 50 and body["previous"] is None

    # The example's customer, field by field: only the organization's id differs.
    expected = copy.deepcopy(RESPAN_LIST_EXAMPLE["results"][0])
    expected["unique_organization_id"] = str(org.id)
    expected["id"] = "user_123" + "prod" + str(org.id)
    assert body["results"][0] == expected
    assert_like(body["results"][0], RESPAN_LIST_EXAMPLE["results"][0])  # no nulls for a complete customer
    for result in body["results"]:
        for key in ("first_seen", "last_active_timeframe"):
            assert result[key] is None or ISO_Z.match(result[key]), result[key]
        assert result["id"] == result["customer_identifier"] + "prod" + str(org.id)

    # next is an absolute URL to page 2 of the same query; previous of page 2 back to page 1.
    nxt = URL(body["next"])
    assert nxt.is_absolute() and nxt.scheme == "http" and nxt.path == RESPAN_LIST
    assert dict(nxt.query) == {"page": "2", "page_size": "50", "sort_by": "-first_seen", "environment": "prod"}
    second = await get_json(client, rel(body["next"]), org.headers())
    assert second["count"] == 51 and second["next"] is None and len(second["results"]) == 1
    prev = URL(second["previous"])
    assert prev.is_absolute() and prev.path == RESPAN_LIST and prev.query["page"] == "1"
    assert await get_json(client, rel(second["previous"]), org.headers()) == body

    walked = [r["customer_identifier"] for page in (body, second) for r in page["results"]]
    assert walked == [r["customer_identifier"] for r in by_first_seen_desc([user, *others])]

    # Every default is the doc's (page 1, 50 per page, -first_seen, prod); next is then the
    # example's own link: the list's URL with ?page=2.
    default = await get_json(client, RESPAN_LIST, org.headers())
    assert {**default, "next": None} == {**body, "next": None}
    assert URL(default["next"]).path == RESPAN_LIST and dict(URL(default["next"]).query) == {"page": "2"}
    # Respan's docs type page and page_size as numbers ("double"): whole values written as such work.
    assert await get_json(client, RESPAN_LIST + "?page=1.0&page_size=50.0", org.headers()) == {
        **default,
        "next": ANY_LINK,
    }
    await problem(await client.get(RESPAN_LIST + "?page=1.5", headers=org.headers()), 400, "page")


async def test_respan_list_sorts_by_the_fields_the_docs_name(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    rows = []
    for i, (email, cost, requests) in enumerate(
        [("d@x.io", "5.5", 7), ("a@x.io", "10", 1), (None, "0.25", 30), ("c@x.io", "100", 4), ("b@x.io", "9.75", 12)]
    ):
        rows.append(
            await insert_customer(
                pool,
                org,
                f"sorted_{'qwert'[i]}",
                email=email,
                total_cost=Decimal(cost),
                number_of_requests=requests,
                first_seen=datetime(2025, 5, 1 + (i * 3) % 5, tzinfo=UTC),
            )
        )

    def order(key, reverse=False) -> list[str]:
        return [r["customer_identifier"] for r in sorted(rows, key=key, reverse=reverse)]

    cases = {
        "customer_identifier": order(lambda r: r["customer_identifier"]),
        "-total_cost": order(lambda r: r["total_cost"], reverse=True),
        "email": order(lambda r: r["email"] or ""),  # a missing e-mail sorts lowest
        "-number_of_requests": order(lambda r: r["number_of_requests"], reverse=True),
        "-first_seen": order(lambda r: r["first_seen"], reverse=True),
        "first_seen": order(lambda r: r["first_seen"]),
    }
    for sort_by, want in cases.items():
        body = await get_json(client, f"{RESPAN_LIST}?sort_by={sort_by}", org.headers())
        assert [r["customer_identifier"] for r in body["results"]] == want, sort_by
    await problem(await client.get(f"{RESPAN_LIST}?sort_by=-shoe_size", headers=org.headers()), 400, "sort_by")


async def test_respan_following_next_walks_everything_exactly_once(client: TestClient, crowd: Crowd) -> None:
    org, rows = crowd
    first = await get_json(client, f"{RESPAN_LIST}?page_size=7", org.headers())
    pages = await follow(client, first, org.headers())
    assert len(pages) == -(-CROWD_SIZE // 7)
    assert all(p["count"] == CROWD_SIZE for p in pages)
    walked = [r["customer_identifier"] for p in pages for r in p["results"]]
    assert walked == [r["customer_identifier"] for r in by_first_seen_desc(rows)]  # each once, in order
    for page in pages:
        for link in (page["next"], page["previous"]):
            if link is not None:
                assert URL(link).is_absolute() and URL(link).path == RESPAN_LIST
                assert URL(link).query["page_size"] == "7"
    # ...and previous walks back over the same pages.
    back = await follow(client, pages[-1], org.headers(), link="previous")
    assert [p["results"] for p in reversed(back)] == [p["results"] for p in pages]
    # Past the end: an empty page, no next.
    beyond = await get_json(client, f"{RESPAN_LIST}?page_size=7&page={len(pages) + 1}", org.headers())
    assert beyond["results"] == [] and beyond["next"] is None and beyond["count"] == CROWD_SIZE


@pytest.mark.parametrize(
    "query, name",
    [
        ("page_size=1001", "page_size"),
        ("page_size=0", "page_size"),
        ("page_size=ten", "page_size"),
        ("page=0", "page"),
        ("page=-1", "page"),
        ("page=x", "page"),
        ("sort_by=bogus", "sort_by"),
        ("environment=staging", "environment"),
        ("colour=blue", "colour"),
    ],
)
async def test_respan_list_refuses_bad_parameters(client: TestClient, org: Org, query: str, name: str) -> None:
    await problem(await client.get(f"{RESPAN_LIST}?{query}", headers=org.headers()), 400, name)


async def test_respan_page_size_maximum_is_1000(client: TestClient, crowd: Crowd) -> None:
    org, _ = crowd
    body = await get_json(client, f"{RESPAN_LIST}?page_size=1000", org.headers())
    assert len(body["results"]) == CROWD_SIZE and body["next"] is None and body["count"] == CROWD_SIZE


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Token abc"},
        {"Authorization": "Bearer tly_000000000000.wrong-secret"},
    ],
    ids=["missing", "empty", "malformed", "scheme", "unknown"],
)
async def test_respan_missing_or_bad_key_is_401(
    client: TestClient, pool: asyncpg.Pool, org: Org, headers: dict[str, str]
) -> None:
    await insert_customer(pool, org, "user_123")
    for method, path in [
        ("GET", RESPAN_LIST),
        ("GET", RESPAN_USER.format("user_123")),
        ("PATCH", RESPAN_USER.format("user_123")),
        ("DELETE", RESPAN_USER.format("user_123")),
    ]:
        resp = await client.request(method, path, headers=headers, json={"name": "x"} if method == "PATCH" else None)
        await problem(resp, 401)
    # A wrong secret for a real client key is 401 too, and changed nothing.
    wrong = {"Authorization": "Bearer " + org.key.partition(".")[0] + ".not-the-secret"}
    await problem(await client.get(RESPAN_LIST, headers=wrong), 401)
    assert await pool.fetchval("SELECT count(*) FROM customers WHERE organization_id = $1", org.id) == 1


async def test_respan_environment_parameter(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    prod = await insert_customer(pool, org, uid("prod"))
    test = await insert_customer(pool, org, uid("test"), environment="test")
    # One rule for list and detail: the key's environment unless the request names one (a
    # customer the list returns is one retrieve finds).
    for key, expected in ((org.key, prod), (org.test_key, test)):
        body = await get_json(client, RESPAN_LIST, org.headers(key))
        assert [r["customer_identifier"] for r in body["results"]] == [expected["customer_identifier"]]
        for method in (client.get, client.post):
            listed = await ok_json(await method(RESPAN_LIST, headers=org.headers(key)))
            assert listed["results"] == body["results"]
        found = await get_json(client, RESPAN_USER.format(expected["customer_identifier"]), org.headers(key))
        assert found["customer_identifier"] == expected["customer_identifier"]
    body = await get_json(client, f"{RESPAN_LIST}?environment=test", org.headers(org.test_key))
    assert [(r["customer_identifier"], r["environment"], r["id"]) for r in body["results"]] == [
        (test["customer_identifier"], "test", test["customer_identifier"] + "test" + str(org.id))
    ]
    # A key reaches its own environment only: naming the other one is a 403 naming the parameter.
    test_path = RESPAN_USER.format(test["customer_identifier"])
    await problem(await client.get(test_path, headers=org.headers()), 404)
    for path in (test_path + "?environment=test", f"{RESPAN_LIST}?environment=test"):
        body = await problem(await client.get(path, headers=org.headers()), 403, "environment")
        assert "'prod'" in body["detail"]
    await problem(await client.post(f"{RESPAN_LIST}?environment=test", headers=org.headers()), 403, "environment")
    for method in ("PATCH", "DELETE"):
        resp = await client.request(method, test_path + "?environment=test", json={"name": "x"}, headers=org.headers())
        await problem(resp, 403, "environment")
    assert (await get_json(client, test_path + "?environment=test", org.headers(org.test_key)))["environment"] == "test"
    assert (await get_json(client, test_path, org.headers(org.test_key)))["environment"] == "test"
    await problem(await client.get(test_path + "?environment=qa", headers=org.headers()), 400, "environment")


async def _period(pool: asyncpg.Pool, duration: str) -> tuple[datetime, datetime]:
    row = await pool.fetchrow("SELECT tally_period_start($1, now()) AS s, tally_period_end($1, now()) AS e", duration)
    return row["s"], row["e"]


async def test_respan_detail_replays_the_docs_example(
    client: TestClient, pool: asyncpg.Pool, org: Org, openapi_doc: dict
) -> None:
    user = await _respan_example_user(pool, org)
    for _ in range(3):  # the expected period is read around the request: retry if a month began meanwhile
        start, end = await _period(pool, "monthly")
        await pool.execute("DELETE FROM daily_usage WHERE organization_id = $1", org.id)
        await add_daily_cost(pool, user, start.date(), Decimal("45.67"))  # inside the current month
        await add_daily_cost(pool, user, start.date() - timedelta(days=1), Decimal("400"))  # the month before
        body = await get_json(client, RESPAN_USER.format("user_123") + "?environment=prod", org.headers())
        if await _period(pool, "monthly") == (start, end):
            break
    check_schema(
        body, response_schema(openapi_doc, "GET", "/compat/respan/api/users/{customer_identifier}/"), openapi_doc
    )
    # The doc types period_end "datetime or null" (its example shows null; tally knows the end).
    assert_like(body, RESPAN_DETAIL_EXAMPLE, also={"period_end": {"string"}})
    expected = {**RESPAN_DETAIL_EXAMPLE, "organization_name": org.name, "period_start": z(start), "period_end": z(end)}
    assert body == expected
    for key in ("period_start", "period_end", "updated_at"):
        assert ISO_Z.match(body[key])


@pytest.mark.parametrize("duration", ["daily", "weekly", "monthly", "yearly"])
async def test_respan_detail_budget_periods(client: TestClient, pool: asyncpg.Pool, org: Org, duration: str) -> None:
    ident = uid("budget")
    row = await insert_customer(
        pool,
        org,
        ident,
        total_cost=Decimal("77"),
        total_budget=Decimal("12.5"),
        period_budget=Decimal("2.25"),
        budget_duration=duration,
    )
    for _ in range(3):
        start, end = await _period(pool, duration)
        await pool.execute("DELETE FROM daily_usage WHERE organization_id = $1", org.id)
        await add_daily_cost(pool, row, start.date(), Decimal("1.5"))  # the first day of the period
        if end - start > timedelta(days=1):
            await add_daily_cost(pool, row, (end - timedelta(days=1)).date(), Decimal("0.25"))  # its last day
        await add_daily_cost(pool, row, start.date() - timedelta(days=1), Decimal("30"))
        await add_daily_cost(pool, row, end.date(), Decimal("40"))
        body = await get_json(client, RESPAN_USER.format(ident), org.headers())
        if await _period(pool, duration) == (start, end):
            break
    inside = Decimal("1.5") + (Decimal("0.25") if end - start > timedelta(days=1) else 0)
    assert (body["period_start"], body["period_end"], body["budget_duration"]) == (z(start), z(end), duration)
    assert body["total_period_usage"] == float(inside) and kind(body["total_period_usage"]) == "number"
    assert (body["total_budget"], body["period_budget"]) == (12.5, 2.25)


async def test_respan_detail_without_budget(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    """No budget_duration: the period is the customer's life, so the usage is the lifetime cost."""
    ident = uid("nobudget")
    await insert_customer(pool, org, ident, total_cost=Decimal("12.34"))
    body = await get_json(client, RESPAN_USER.format(ident), org.headers())
    assert set(body) == set(RESPAN_DETAIL_EXAMPLE)
    assert body["total_period_usage"] == 12.34
    assert body["total_budget"] is None and body["period_budget"] is None  # "double or null"
    assert body["name"] is None and body["email"] is None  # "string or null"


@pytest.mark.parametrize("identifier", ["with space", "q?x=1", "hash#1", "slash/ed", "pct%41", "ünïcode", "dot.s"])
async def test_respan_detail_for_any_identifier(
    client: TestClient, pool: asyncpg.Pool, org: Org, identifier: str
) -> None:
    ident = uid() + identifier
    await insert_customer(pool, org, ident, name="Odd")
    path = RESPAN_USER.format(quote(ident, safe=""))
    assert (await get_json(client, path, org.headers()))["customer_identifier"] == ident
    assert (await ok_json(await client.patch(path, json={"name": "Even"}, headers=org.headers())))["name"] == "Even"
    assert (await client.delete(path, headers=org.headers())).status == 204
    await problem(await client.get(path, headers=org.headers()), 404)


async def test_respan_detail_unknown_customer_and_other_organization(
    client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    await insert_customer(pool, org, "user_123", name="Mine")
    await problem(await client.get(RESPAN_USER.format("no_such_user"), headers=org.headers()), 404)
    # Another organization's key: the customer does not exist for it.
    await problem(await client.get(RESPAN_USER.format("user_123"), headers=other_org.headers()), 404)
    await problem(
        await client.patch(RESPAN_USER.format("user_123"), json={"name": "Theirs"}, headers=other_org.headers()), 404
    )
    await problem(await client.delete(RESPAN_USER.format("user_123"), headers=other_org.headers()), 404)
    listed = await get_json(client, RESPAN_LIST, other_org.headers())
    assert listed["count"] == 0 and listed["results"] == []
    assert (await get_json(client, RESPAN_USER.format("user_123"), org.headers()))["name"] == "Mine"


async def test_respan_patch_updates_the_budget_fields(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("patch")
    await insert_customer(pool, org, ident, name="Before", email="before@example.com", total_cost=Decimal("3"))
    changes = {
        "name": "John Doe",
        "email": "john@example.com",
        "total_budget": 1000,
        "period_budget": 45.67,
        "budget_duration": "weekly",
    }
    resp = await client.patch(RESPAN_USER.format(ident), json=changes, headers=org.headers())
    body = await ok_json(resp)
    assert_like(body, RESPAN_DETAIL_EXAMPLE, also={"period_end": {"string"}})
    assert {k: body[k] for k in changes} == changes
    start, _ = await _period(pool, "weekly")
    assert parse_z(body["period_start"]).weekday() == 0 and parse_z(body["period_start"]) <= start + timedelta(days=7)
    assert await get_json(client, RESPAN_USER.format(ident), org.headers()) == body
    stored = await pool.fetchrow(
        "SELECT name, email, total_budget, period_budget, budget_duration, total_cost FROM customer_rows"
        " WHERE organization_id = $1 AND customer_identifier = $2",
        org.id,
        ident,
    )
    assert dict(stored) == {
        "name": "John Doe",
        "email": "john@example.com",
        "total_budget": Decimal("1000"),
        "period_budget": Decimal("45.67"),
        "budget_duration": "weekly",
        "total_cost": Decimal("3"),
    }
    # Only what is sent changes; null clears a budget field.
    body = await ok_json(
        await client.patch(
            RESPAN_USER.format(ident), json={"budget_duration": None, "total_budget": None}, headers=org.headers()
        )
    )
    assert body["budget_duration"] is None and body["total_budget"] is None
    assert body["period_budget"] == 45.67 and body["name"] == "John Doe"
    assert body["total_period_usage"] == 3  # lifetime again
    # An empty patch changes nothing; an unknown customer is 404.
    assert await ok_json(await client.patch(RESPAN_USER.format(ident), json={}, headers=org.headers())) == body
    await problem(await client.patch(RESPAN_USER.format(uid()), json={"name": "x"}, headers=org.headers()), 404)


@pytest.mark.parametrize(
    "patch, name",
    [
        ({"total_cost": 1}, "total_cost"),
        ({"id": "x"}, "id"),
        ({"customer_identifier": "x"}, "customer_identifier"),
        ({"environment": "test"}, "environment"),
        ({"total_period_usage": 0}, "total_period_usage"),
        ({"period_start": "2025-12-01T00:00:00Z"}, "period_start"),
        ({"period_end": None}, "period_end"),
        ({"markup_percentage": 10}, "markup_percentage"),
        ({"organization_name": "Acme Inc"}, "organization_name"),
        ({"updated_at": "2025-12-29T10:30:00Z"}, "updated_at"),
        ({"number_of_requests": 5}, "number_of_requests"),
        ({"nickname": "JD"}, "nickname"),
        ({"name": "ok", "shoe_size": 44}, "shoe_size"),
        ({"budget_duration": "hourly"}, "budget_duration"),
        ({"total_budget": -1}, "total_budget"),
        ({"period_budget": "lots"}, "period_budget"),
    ],
)
async def test_respan_patch_refuses_read_only_and_unknown_fields(
    client: TestClient, pool: asyncpg.Pool, org: Org, patch: dict, name: str
) -> None:
    ident = uid("ro")
    await insert_customer(pool, org, ident, name="Kept", total_budget=Decimal("5"))
    before = await get_json(client, RESPAN_USER.format(ident), org.headers())
    body = await problem(await client.patch(RESPAN_USER.format(ident), json=patch, headers=org.headers()), 400, name)
    assert [e["in"] for e in body["errors"]] == ["body"]
    assert await get_json(client, RESPAN_USER.format(ident), org.headers()) == before  # nothing changed


async def test_respan_patch_refuses_bodies_that_are_not_objects(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    ident = uid("body")
    await insert_customer(pool, org, ident)
    for data in (b"[]", b"{", b'"name"'):
        resp = await client.patch(
            RESPAN_USER.format(ident), data=data, headers={**org.headers(), "Content-Type": "application/json"}
        )
        await problem(resp, 400, "body")


async def test_respan_delete(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("gone")
    row = await insert_customer(pool, org, ident)
    await add_daily_cost(pool, row, date(2025, 1, 1), Decimal("1"))
    await add_subscription(pool, org, row["id"], uid("sub"), "active")
    resp = await client.delete(RESPAN_USER.format(ident), headers=org.headers())
    assert resp.status == 204 and await resp.read() == b""
    await problem(await client.get(RESPAN_USER.format(ident), headers=org.headers()), 404)
    await problem(await client.delete(RESPAN_USER.format(ident), headers=org.headers()), 404)
    await problem(await client.patch(RESPAN_USER.format(ident), json={"name": "x"}, headers=org.headers()), 404)
    assert (await get_json(client, RESPAN_LIST, org.headers()))["count"] == 0
    for table in ("customers", "daily_usage", "subscriptions"):
        assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE organization_id = $1", org.id) == 0


async def test_respan_writes_need_the_write_scope(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("scope")
    await insert_customer(pool, org, ident, name="Same")
    read = org.headers(org.read_key)
    await problem(await client.patch(RESPAN_USER.format(ident), json={"name": "x"}, headers=read), 403)
    await problem(await client.delete(RESPAN_USER.format(ident), headers=read), 403)
    assert (await get_json(client, RESPAN_USER.format(ident), read))["name"] == "Same"


# ---- POST /api/users/list/ with filters (what Respan's SDK sends) ------------------------------


async def _filtered(client: TestClient, org: Org, filters: Any, query: str = "") -> list[str]:
    resp = await client.post(RESPAN_LIST + query, json={"filters": filters}, headers=org.headers())
    return sorted(r["customer_identifier"] for r in (await ok_json(resp))["results"])


async def test_respan_filter_operators(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    a = await insert_customer(
        pool, org, "fa_1", name="Ada 50%_off", email="ada@acme.dev", number_of_requests=10, total_cost=Decimal("12.5")
    )
    b = await insert_customer(pool, org, "fb_2", name="bob", email="bob@other.io", number_of_requests=3)
    c = await insert_customer(pool, org, "fc_3", name=None, email=None, total_cost=Decimal("99"))
    ids = [a["customer_identifier"], b["customer_identifier"], c["customer_identifier"]]
    cases: list[tuple[Any, list[str]]] = [
        ({}, ids),
        ({"customer_identifier": {"operator": "", "value": ["fa_1"]}}, ["fa_1"]),
        ({"customer_identifier": {"value": ["fa_1", "fb_2"]}}, ["fa_1", "fb_2"]),
        ({"customer_identifier": {"operator": "in", "value": ["fb_2", "zz"]}}, ["fb_2"]),
        ({"customer_identifier": {"operator": "not", "value": ["fa_1"]}}, ["fb_2", "fc_3"]),
        ({"name": {"operator": "not_in", "value": ["bob"]}}, ["fa_1", "fc_3"]),  # a missing name is not "bob"
        ({"total_cost": {"operator": "gte", "value": [12.5]}}, ["fa_1", "fc_3"]),
        ({"total_cost": {"operator": "gt", "value": ["12.5"]}}, ["fc_3"]),
        ({"number_of_requests": {"operator": "lt", "value": [10]}}, ["fb_2", "fc_3"]),
        ({"number_of_requests": {"operator": "lte", "value": [10]}}, ids),
        ({"number_of_requests": [{"operator": "gt", "value": [1]}, {"operator": "lt", "value": [5]}]}, ["fb_2"]),
        ({"name": {"operator": "contains", "value": ["50%_"]}}, ["fa_1"]),  # LIKE metacharacters are literal
        ({"name": {"operator": "contains", "value": ["%"]}}, ["fa_1"]),
        ({"name": {"operator": "contains", "value": ["ADA"]}}, []),
        ({"name": {"operator": "icontains", "value": ["ADA"]}}, ["fa_1"]),
        ({"name": {"operator": "not_contains", "value": ["b"]}}, ["fa_1", "fc_3"]),
        ({"email": {"operator": "endswith", "value": ["@acme.dev"]}}, ["fa_1"]),
        ({"email": {"operator": "not_endswith", "value": ["@acme.dev"]}}, ["fb_2", "fc_3"]),
        ({"email": {"operator": "startswith", "value": ["bo"]}}, ["fb_2"]),
        ({"email": {"operator": "not_startswith", "value": ["bo"]}}, ["fa_1", "fc_3"]),
        ({"email": {"operator": "empty", "value": [""]}}, ["fc_3"]),
        ({"email": {"operator": "not_empty", "value": [""]}}, ["fa_1", "fb_2"]),
        ({"environment": {"operator": "", "value": ["prod"]}}, ids),
        (
            {"total_cost": {"operator": "gte", "value": [10]}, "email": {"operator": "endswith", "value": [".dev"]}},
            ["fa_1"],
        ),
    ]
    for filters, expected in cases:
        assert await _filtered(client, org, filters) == expected, filters
    # The count is the filtered total, and the pager's pages carry the same filters.
    resp = await client.post(
        RESPAN_LIST + "?page_size=1&sort_by=customer_identifier",
        json={"filters": {"name": {"operator": "not_empty", "value": [""]}}},
        headers=org.headers(),
    )
    body = await ok_json(resp)
    assert body["count"] == 2 and [r["customer_identifier"] for r in body["results"]] == ["fa_1"]
    assert body["next"] is not None


async def test_respan_post_list_links_carry_its_filters(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    """A filtered POST list's next and previous links list the same filtered customers,
    followed as a GET (a browser, curl) or as a POST without a body."""
    for i in range(5):
        await insert_customer(pool, org, f"keep_{i}", email=f"k{i}@acme.dev")
    for i in range(4):
        await insert_customer(pool, org, f"drop_{i}", email=f"d{i}@other.io")
    filters = {"email": {"operator": "endswith", "value": ["@acme.dev"]}}
    first = await ok_json(
        await client.post(
            RESPAN_LIST + "?page_size=2&sort_by=customer_identifier", json={"filters": filters}, headers=org.headers()
        )
    )
    assert first["count"] == 5
    for method in ("GET", "POST"):
        pages = [first]
        while pages[-1]["next"] is not None:
            assert len(pages) < 10
            resp = await client.request(method, rel(pages[-1]["next"]), headers=org.headers())
            pages.append(await ok_json(resp))
        assert [p["count"] for p in pages] == [5, 5, 5], method
        walked = [r["customer_identifier"] for p in pages for r in p["results"]]
        assert walked == [f"keep_{i}" for i in range(5)], (method, walked)
        back = await ok_json(await client.request(method, rel(pages[-1]["previous"]), headers=org.headers()))
        assert back["results"] == pages[-2]["results"]
    # An unfiltered POST list links without filters.
    plain = await ok_json(await client.post(RESPAN_LIST + "?page_size=2", headers=org.headers()))
    assert "filters=" not in plain["next"]


async def test_respan_filters_parameter_is_checked(client: TestClient, org: Org) -> None:
    await problem(await client.get(RESPAN_LIST + "?filters=bm90IGpzb24", headers=org.headers()), 400, "filters")
    await problem(await client.get(RESPAN_LIST + "?filters=%%%", headers=org.headers()), 400, "filters")
    carried = base64.urlsafe_b64encode(b'{"name":{"value":["a"]}}').rstrip(b"=").decode()
    resp = await client.post(
        RESPAN_LIST + "?filters=" + carried, json={"filters": {"name": {"value": ["b"]}}}, headers=org.headers()
    )
    await problem(resp, 400, "filters")
    bad = base64.urlsafe_b64encode(b'{"nope":{"value":["a"]}}').rstrip(b"=").decode()
    await problem(await client.get(RESPAN_LIST + "?filters=" + bad, headers=org.headers()), 400, "filters.nope")


async def test_respan_filter_environment_chooses_the_environment(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    await insert_customer(pool, org, "envp")
    await insert_customer(pool, org, "envt", environment="test")
    test_key = dataclasses.replace(org, key=org.test_key)
    assert await _filtered(client, test_key, {"environment": {"value": ["test"]}}) == ["envt"]
    assert await _filtered(client, org, {"environment": {"value": ["prod"]}}) == ["envp"]
    # Another environment than the key's is a 403 naming the filter.
    resp = await client.post(RESPAN_LIST, json={"filters": {"environment": {"value": ["test"]}}}, headers=org.headers())
    await problem(resp, 403, "filters.environment")
    # The parameter wins: the filter then narrows within it.
    assert await _filtered(client, org, {"environment": {"value": ["test"]}}, "?environment=prod") == []


async def test_respan_bad_filters_are_400_naming_them(client: TestClient, org: Org) -> None:
    headers = org.headers()
    bad: list[tuple[Any, str]] = [
        ({"metadata__plan": {"value": ["pro"]}}, "filters.metadata__plan"),
        ({"name": {"operator": "like", "value": ["x"]}}, "filters.name"),
        ({"total_cost": {"operator": "contains", "value": ["1"]}}, "filters.total_cost"),
        ({"total_cost": {"operator": "gte", "value": ["lots"]}}, "filters.total_cost"),
        ({"total_cost": {"operator": "gte", "value": [1, 2]}}, "filters.total_cost"),
        ({"total_cost": {"operator": "gte", "value": []}}, "filters.total_cost"),
        ({"number_of_requests": {"operator": "gt", "value": [2**70]}}, "filters.number_of_requests"),
        ({"number_of_requests": {"operator": "gt", "value": [1.5]}}, "filters.number_of_requests"),
        ({"number_of_requests": {"operator": "gt", "value": [True]}}, "filters.number_of_requests"),
        ({"name": {"value": ["a\u0000b"]}}, "filters.name"),
        ({"name": {"value": ["x" * 1001]}}, "filters.name"),
        ({"name": {"value": ["x"] * 1001}}, "filters.name"),
        ({"name": [{"operator": "contains", "value": ["a"]}] * 11}, "filters"),
        ({"name": {"value": ["a"] * 600}, "email": {"value": ["b"] * 600}}, "filters"),
        ({"name": {"value": "x"}}, "filters.name"),
        ([{"name": "x"}], "filters"),
        # Numbers the database driver cannot encode, or that cost parsing time for nothing.
        ({"total_cost": {"operator": "gte", "value": ["1e-16384"]}}, "filters.total_cost"),
        ({"total_cost": {"operator": "gte", "value": ["1e-13"]}}, "filters.total_cost"),
        ({"total_cost": {"operator": "gte", "value": ["9" * 14 + "." + "9" * 60_000]}}, "filters.total_cost"),
        ({"total_cost": {"operator": "gte", "value": ["99999999999999.99999999999999"]}}, "filters.total_cost"),
        ({"average_latency": {"operator": "gte", "value": ["1e-16384" + "0" * 100]}}, "filters.average_latency"),
    ]
    for filters, name in bad:
        resp = await client.post(RESPAN_LIST, json={"filters": filters}, headers=headers)
        errors = (await problem(resp, 400))["errors"]
        assert any(e["name"].startswith(name) for e in errors), (filters, errors)
    await problem(await client.post(RESPAN_LIST, data=b"{", headers=headers), 400, "body")
    await problem(await client.post(RESPAN_LIST, json={"filter": {}}, headers=headers), 400, "filter")
