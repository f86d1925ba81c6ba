"""GET /v1/customers (pagination, sorting, filters, embedding, cursors) and the usage series,
against the real database."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from pydantic import ValidationError

from service.api.models import CustomerExpanded, CustomerList, UsageSeries
from service.domain.vocabulary import STATUSES
from service.store.listing import SORT_FIELDS
from tests.factories import Org, add_daily_usage, add_subscription, insert_customer, make_org
from tests.support import (
    follow,
    identifiers,
    ids,
    list_page,
    ok_json,
    problem,
    rel,
    uid,
)

UTC = UTC
BASE = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
COSTS = (Decimal("0"), Decimal("9.5"), Decimal("10.25"))  # text order differs from numeric order
NAMES = (None, "alpha", "bravo", "charlie", "")
EMAILS = (None, "ann@example.com", "bob@example.com")


# ---------------------------------------------------------------------------------------------
# A shared, read-only organization of 120 prod customers (plus a few test-environment ones)
# with many equal sort keys and missing values. No test writes to it.


def _big_fields(i: int) -> dict[str, Any]:
    latency_count = i % 3
    ttft_count = (i + 1) % 3
    return {
        "name": NAMES[i % 5],
        "email": EMAILS[i % 3],
        "status": STATUSES[(i // 5) % 5],
        "first_seen": None if i % 7 == 0 else BASE + timedelta(days=i % 4, microseconds=i % 2),
        "last_active": None if i % 11 == 0 else BASE + timedelta(days=10 + i % 6, hours=i % 2),
        "active_days": i % 4,
        "number_of_requests": (i * 7) % 5,
        "prompt_tokens": (i % 3) * 100,
        "completion_tokens": (i % 6) * 10,
        "total_tokens": (i % 3) * 100 + (i % 6) * 10,
        "total_cost": COSTS[i % 3],
        "latency_sum": 0.1 * (i % 4) * latency_count,
        "latency_count": latency_count,
        "ttft_sum": 0.37 * (i % 5) * ttft_count,
        "ttft_count": ttft_count,
        "total_budget": None if i % 4 == 0 else Decimal(i % 3) * 100,
        "period_budget": None if i % 5 == 0 else Decimal("10.5") * (i % 2),
        "metadata": {"tier": "gold" if i % 2 else "silver"},
    }


@pytest.fixture(scope="module")
async def big(pool: asyncpg.Pool) -> tuple[Org, list[dict[str, Any]]]:
    org = await make_org(pool)
    rows: list[dict[str, Any]] = []
    async with pool.acquire() as conn:
        # Three transactions: created_at/updated_at take only three distinct values (ties).
        for batch in range(3):
            async with conn.transaction():
                for j in range(40):
                    i = batch * 40 + j
                    rows.append(await insert_customer(conn, org, f"big{i:04d}", **_big_fields(i)))
                for j in range(2):
                    await insert_customer(conn, org, f"bigtest{batch}{j}", environment="test")
    return org, rows


_MIN_TIME = datetime.min.replace(tzinfo=UTC)
_TEXT_FIELDS = ("customer_identifier", "name", "email", "status")
_NULLABLE_TIMES = ("first_seen", "last_active")
_NULLABLE_FLOATS = ("average_latency", "average_ttft")
_NULLABLE_DECIMALS = ("total_budget", "period_budget")


def sort_key(row: dict[str, Any], field: str) -> Any:
    """The documented sort semantics: missing values sort lowest (NULL text as '')."""
    value = row[field]
    if value is not None:
        return value
    if field in _TEXT_FIELDS:
        return ""
    if field in _NULLABLE_TIMES:
        return _MIN_TIME
    if field in _NULLABLE_FLOATS:
        return float("-inf")
    if field in _NULLABLE_DECIMALS:
        return Decimal("-Infinity")
    raise AssertionError(f"{field} should never be NULL")


def expected_ids(rows: list[dict[str, Any]], field: str, descending: bool) -> list[str]:
    ordered = sorted(rows, key=lambda r: (sort_key(r, field), r["id"]), reverse=descending)
    return [str(r["id"]) for r in ordered]


SORTS = [
    pytest.param(("-" if desc else "") + f, id=("-" if desc else "") + f) for f in SORT_FIELDS for desc in (False, True)
]


def test_the_big_set_has_ties_and_missing_values() -> None:
    rows = [_big_fields(i) for i in range(120)]
    assert len({r["total_cost"] for r in rows}) == 3
    assert sum(r["first_seen"] is None for r in rows) >= 10
    assert sum(r["latency_count"] == 0 for r in rows) >= 10


@pytest.mark.parametrize("sort_by", SORTS)
async def test_every_sort_field_orders_with_missing_lowest_and_ties_by_id(
    client: TestClient, big, sort_by: str
) -> None:
    org, rows = big
    field, descending = sort_by.lstrip("-"), sort_by.startswith("-")
    page = await list_page(client, org.headers(), sort_by=sort_by, limit=1000)
    assert page["count"] == 120
    assert page["next"] is None and page["previous"] is None and page["next_cursor"] is None
    assert ids(page) == expected_ids(rows, field, descending)
    # missing values sort lowest: first ascending, last descending
    if field in ("first_seen", "average_latency", "total_budget"):
        nulls = [c for c in page["results"] if c[field] is None]
        assert nulls, field
        edge = page["results"][-len(nulls) :] if descending else page["results"][: len(nulls)]
        assert edge == nulls


@pytest.mark.parametrize("sort_by", SORTS)
async def test_cursor_walk_equals_offset_order_and_walks_back(client: TestClient, big, sort_by: str) -> None:
    org, rows = big
    field, descending = sort_by.lstrip("-"), sort_by.startswith("-")
    expected = expected_ids(rows, field, descending)
    h = org.headers()
    first = await list_page(client, h, sort_by=sort_by, limit=17)
    assert first["next_cursor"]
    second = await list_page(client, h, cursor=first["next_cursor"], limit=17)
    pages = [first, *await follow(client, second, h)]
    walked = ids(pages)
    assert len(walked) == len(set(walked)), "a row appeared twice"
    assert walked == expected
    assert [len(p["results"]) for p in pages] == [17] * 7 + [1]
    assert all(p["count"] == 120 for p in pages)
    assert pages[-1]["next"] is None and pages[-1]["next_cursor"] is None
    # Backwards from the last page with the previous links: the same pages, in reverse.
    back = await follow(client, pages[-1], h, link="previous")
    assert [ids(p) for p in back] == [ids(p) for p in reversed(pages[1:])] + [ids(first)]
    assert back[-1]["previous"] is None
    # A page reached backwards still leads forwards.
    again = await ok_json(await client.get(rel(back[-1]["next"]), headers=h))
    assert ids(again) == ids(pages[1])


@pytest.mark.parametrize(
    "sort_by", ["-first_seen", "total_cost", "-total_cost", "name", "-average_latency", "created_at"]
)
async def test_offset_page_and_cursor_walks_agree(client: TestClient, big, sort_by: str) -> None:
    org, rows = big
    h = org.headers()
    expected = expected_ids(rows, sort_by.lstrip("-"), sort_by.startswith("-"))
    by_offset = await follow(client, await list_page(client, h, sort_by=sort_by, limit=25), h)
    by_page = await follow(client, await list_page(client, h, sort_by=sort_by, page=1, page_size=25), h)
    first = await list_page(client, h, sort_by=sort_by, limit=25)
    by_cursor = [first, *await follow(client, await list_page(client, h, cursor=first["next_cursor"], limit=25), h)]
    assert ids(by_offset) == ids(by_page) == ids(by_cursor) == expected
    assert [len(p["results"]) for p in by_offset] == [25, 25, 25, 25, 20]


async def test_default_sort_and_limit(client: TestClient, big) -> None:
    org, rows = big
    page = await list_page(client, org.headers())
    assert len(page["results"]) == 50
    assert page["count"] == 120
    assert ids(page) == expected_ids(rows, "first_seen", True)[:50]


async def test_other_environment_rows_never_appear(client: TestClient, big) -> None:
    org, _ = big
    page = await list_page(client, org.headers(), limit=1000)
    assert all(c["environment"] == "prod" for c in page["results"])
    test = await list_page(client, org.headers(org.test_key), limit=1000, environment="test")
    assert test["count"] == 6
    assert {c["environment"] for c in test["results"]} == {"test"}
    by_test_key = await list_page(client, org.headers(org.test_key), limit=1000)
    assert sorted(identifiers(by_test_key)) == sorted(identifiers(test))


async def test_list_response_matches_the_model(client: TestClient, big) -> None:
    org, rows = big
    page = await list_page(client, org.headers(), limit=30, expand="parent_customer", include="subscriptions")
    parsed = CustomerList.model_validate(page)
    assert len(parsed.results) == 30
    for raw in page["results"]:
        # nothing undocumented in the response
        assert set(raw) == set(CustomerExpanded.model_fields)
        assert set(raw["address"]) == {"line1", "line2", "city", "state", "postal_code", "country"}
    # money is a decimal string, never a float
    by_id = {str(r["id"]): r for r in rows}
    for raw in page["results"]:
        assert isinstance(raw["total_cost"], str)
        assert Decimal(raw["total_cost"]) == by_id[raw["id"]]["total_cost"]


# ---------------------------------------------------------------------------------------------
# Pagination styles, links and bounds on a small organization.


@pytest.fixture
async def twenty(pool: asyncpg.Pool, org: Org) -> tuple[Org, list[str]]:
    """20 customers whose order by customer_identifier is known."""
    prefix = uid("p")
    made = [await insert_customer(pool, org, f"{prefix}_{i:02d}", total_cost=Decimal(i)) for i in range(20)]
    return org, [str(r["id"]) for r in made]


async def test_offset_style_links(client: TestClient, twenty) -> None:
    org, expected = twenty
    h = org.headers()
    first = await list_page(client, h, sort_by="customer_identifier", limit=7)
    assert first["previous"] is None
    pages = await follow(client, first, h)
    assert [len(p["results"]) for p in pages] == [7, 7, 6]
    assert ids(pages) == expected
    assert all(p["count"] == 20 for p in pages)
    assert "offset=7" in pages[0]["next"] and "limit=7" in pages[0]["next"]
    # previous of page 2 is page 1, and previous of page 3 is page 2
    back = await ok_json(await client.get(rel(pages[1]["previous"]), headers=h))
    assert ids(back) == ids(pages[0])
    assert back["previous"] is None
    back2 = await ok_json(await client.get(rel(pages[2]["previous"]), headers=h))
    assert ids(back2) == ids(pages[1])


async def test_offset_and_limit_values(client: TestClient, twenty) -> None:
    org, expected = twenty
    h = org.headers()
    page = await list_page(client, h, sort_by="customer_identifier", limit=5, offset=3)
    assert ids(page) == expected[3:8]
    assert ids(await list_page(client, h, sort_by="customer_identifier", offset=18)) == expected[18:]
    beyond = await list_page(client, h, sort_by="customer_identifier", offset=100)
    assert beyond["results"] == [] and beyond["count"] == 20 and beyond["next"] is None
    assert len((await list_page(client, h, limit=1))["results"]) == 1
    assert len((await list_page(client, h, limit=1000))["results"]) == 20


async def test_page_style_links(client: TestClient, twenty) -> None:
    org, expected = twenty
    h = org.headers()
    first = await list_page(client, h, sort_by="-customer_identifier", page=1, page_size=6)
    pages = await follow(client, first, h)
    assert [len(p["results"]) for p in pages] == [6, 6, 6, 2]
    assert ids(pages) == expected[::-1]
    assert all(p["count"] == 20 for p in pages)
    assert "page=2" in pages[0]["next"] and "page_size=6" in pages[0]["next"]
    assert pages[0]["previous"] is None
    back = await ok_json(await client.get(rel(pages[1]["previous"]), headers=h))
    assert ids(back) == ids(pages[0])
    # page_size alone is page 1; page alone uses the default size
    assert ids(await list_page(client, h, sort_by="-customer_identifier", page_size=6)) == ids(pages[0])
    assert ids(await list_page(client, h, sort_by="customer_identifier", page=1)) == expected
    assert (await list_page(client, h, page=2))["results"] == []


async def test_cursor_style_links(client: TestClient, twenty) -> None:
    org, expected = twenty
    h = org.headers()
    first = await list_page(client, h, sort_by="total_cost", limit=8)
    second = await list_page(client, h, cursor=first["next_cursor"], limit=8)
    assert "cursor=" in second["next"] and "offset" not in second["next"]
    pages = [first, *await follow(client, second, h)]
    assert ids(pages) == expected
    back = await ok_json(await client.get(rel(second["previous"]), headers=h))
    assert ids(back) == ids(first)
    assert back["previous"] is None
    # naming the cursor's own sort is allowed
    same = await list_page(client, h, cursor=first["next_cursor"], limit=8, sort_by="total_cost")
    assert ids(same) == ids(second)
    # a cursor without limit uses the default page size
    rest = await list_page(client, h, cursor=first["next_cursor"])
    assert ids(rest) == expected[8:]


@pytest.mark.parametrize(
    "params, name",
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "-5"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"page_size": "0"}, "page_size"),
        ({"page_size": "1001"}, "page_size"),
        ({"page_size": "x"}, "page_size"),
        ({"offset": "-1"}, "offset"),
        ({"offset": "abc"}, "offset"),
        ({"page": "0"}, "page"),
        ({"page": "-1"}, "page"),
        ({"page": "two"}, "page"),
        ({"sort_by": "password"}, "sort_by"),
        ({"sort_by": "-"}, "sort_by"),
        ({"sort_by": "--name"}, "sort_by"),
        ({"environment": "staging"}, "environment"),
        ({"status": "bogus"}, "status"),
        ({"status": "active,bogus"}, "status"),
        ({"customer_ids": "not-a-uuid"}, "customer_ids"),
        ({"parent_customer_ids": "123"}, "parent_customer_ids"),
        ({"first_seen_gte": "yesterday"}, "first_seen_gte"),
        ({"first_seen_lte": "2026-13-01"}, "first_seen_lte"),
        ({"last_active_gte": "2026-02-30T00:00:00Z"}, "last_active_gte"),
        ({"last_active_lte": "soon"}, "last_active_lte"),
        ({"total_cost_gte": "cheap"}, "total_cost_gte"),
        ({"total_cost_lte": "-1"}, "total_cost_lte"),
        ({"total_cost_gte": "1e-16384"}, "total_cost_gte"),
        ({"total_cost_gte": "9" * 14 + "." + "9" * 100_000}, "total_cost_gte"),
        ({"expand": "children"}, "expand"),
        ({"include": "invoices"}, "include"),
        ({"metadata": "plain"}, "metadata"),
    ],
)
async def test_invalid_parameter_is_a_400_naming_it(client: TestClient, org: Org, params: dict, name: str) -> None:
    resp = await client.get("/v1/customers", params=params, headers=org.headers())
    body = await problem(resp, 400, name)
    assert all(e["in"] == "query" for e in body["errors"])


@pytest.mark.parametrize(
    "query, names",
    [
        ("page=1&limit=10", {"page", "limit"}),
        ("page=2&offset=10", {"page", "offset"}),
        ("page_size=10&offset=10", {"page_size", "page", "offset"}),
        ("page_size=10&limit=10", {"page_size", "page", "limit"}),
    ],
)
async def test_mixing_page_with_limit_or_offset(client: TestClient, org: Org, query: str, names: set[str]) -> None:
    body = await problem(await client.get(f"/v1/customers?{query}", headers=org.headers()), 400)
    assert {e["name"] for e in body["errors"]} & names


@pytest.mark.parametrize("extra", ["offset=0", "offset=5", "page=1", "page=2", "page_size=5"])
async def test_cursor_cannot_combine_with_offset_or_page(client: TestClient, twenty, extra: str) -> None:
    org, _ = twenty
    first = await list_page(client, org.headers(), limit=5)
    resp = await client.get(f"/v1/customers?cursor={first['next_cursor']}&{extra}", headers=org.headers())
    await problem(resp, 400, "cursor")


@pytest.mark.parametrize(
    "name", ["limit", "offset", "page", "page_size", "sort_by", "name", "email", "cursor", "environment"]
)
async def test_repeated_scalar_parameter(client: TestClient, org: Org, name: str) -> None:
    values = {"sort_by": ("name", "email"), "environment": ("prod", "test")}.get(name, ("1", "2"))
    resp = await client.get(f"/v1/customers?{name}={values[0]}&{name}={values[1]}", headers=org.headers())
    await problem(resp, 400, name)


@pytest.mark.parametrize("name", ["name", "email", "customer_identifiers", "metadata[plan]", "cursor", "limit"])
async def test_nul_characters_in_a_query_are_a_400(client: TestClient, org: Org, name: str) -> None:
    resp = await client.get(f"/v1/customers?{name}=a%00b", headers=org.headers())
    await problem(resp, 400, name)


async def test_unknown_parameters_are_named(client: TestClient, org: Org) -> None:
    resp = await client.get("/v1/customers?limit=5&colour=red&sort=name", headers=org.headers())
    body = await problem(resp, 400, "colour", "sort")
    assert {e["name"] for e in body["errors"]} == {"colour", "sort"}
    await problem(await client.get("/v1/customers?foo[bar]=1", headers=org.headers()), 400, "foo[bar]")


async def test_pagination_bounds_that_are_allowed(client: TestClient, org: Org) -> None:
    h = org.headers()
    for params in (
        {"limit": 1},
        {"limit": 1000},
        {"page_size": 1000, "page": 1},
        {"offset": 0},
        {"limit": 1000, "offset": 0},
    ):
        page = await list_page(client, h, **params)
        assert page["count"] == 0 and page["results"] == []


# ---------------------------------------------------------------------------------------------
# Filters.


async def test_environment_filter(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    prod = await insert_customer(pool, org, uid("prod"))
    test = await insert_customer(pool, org, uid("test"), environment="test")
    h = org.headers()
    assert ids(await list_page(client, h)) == [str(prod["id"])]
    assert ids(await list_page(client, h, environment="prod")) == [str(prod["id"])]
    assert ids(await list_page(client, org.headers(org.test_key))) == [str(test["id"])]
    assert ids(await list_page(client, org.headers(org.test_key), environment="test")) == [str(test["id"])]
    # A key reaches its own environment only: the other one is a 403 naming the parameter.
    for key, other in ((org.key, "test"), (org.test_key, "prod")):
        resp = await client.get("/v1/customers", params={"environment": other}, headers=org.headers(key))
        await problem(resp, 403, "environment")


async def test_status_filter(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    made = {s: await insert_customer(pool, org, uid(s), status=s) for s in STATUSES}
    h = org.headers()

    def of(*statuses: str) -> set[str]:
        return {str(made[s]["id"]) for s in statuses}

    assert set(ids(await list_page(client, h, status="draft"))) == of("draft")
    assert set(ids(await list_page(client, h, status="draft,archived"))) == of("draft", "archived")
    resp = await client.get("/v1/customers?status=active&status=blacklisted,deactivated", headers=h)
    assert set(ids(await ok_json(resp))) == of("active", "blacklisted", "deactivated")
    page = await list_page(client, h, status="archived,draft")
    assert page["count"] == 2
    assert set(ids(await list_page(client, h))) == of(*STATUSES)


async def test_name_filter_is_partial_case_insensitive_and_literal(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    names = ["Alice Smith", "ALICIA keys", "Bob", "50% off", "50 off", "a_b", "axb", "back\\slash", None]
    made = {n: await insert_customer(pool, org, uid("n"), name=n) for n in names}
    h = org.headers()

    async def names_for(text: str) -> set[str | None]:
        page = await list_page(client, h, name=text, limit=100)
        return {c["name"] for c in page["results"]}

    assert await names_for("alic") == {"Alice Smith", "ALICIA keys"}
    assert await names_for("SMITH") == {"Alice Smith"}
    assert await names_for("%") == {"50% off"}
    assert await names_for("50%") == {"50% off"}
    assert await names_for("a_b") == {"a_b"}
    assert await names_for("_") == {"a_b"}
    assert await names_for("\\") == {"back\\slash"}
    assert await names_for("zzz") == set()
    assert made  # every row was inserted


async def test_email_filter_is_exact_and_case_insensitive(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    bob = await insert_customer(pool, org, uid(), email="Bob@Example.com")
    await insert_customer(pool, org, uid(), email="bob@example.community")
    await insert_customer(pool, org, uid(), email="xbob@example.com")
    h = org.headers()
    assert ids(await list_page(client, h, email="bob@example.COM")) == [str(bob["id"])]
    assert ids(await list_page(client, h, email="Bob@Example.com")) == [str(bob["id"])]
    assert ids(await list_page(client, h, email="bob@")) == []
    assert ids(await list_page(client, h, email="%@example.com")) == []


async def test_id_identifier_and_parent_filters(
    client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    parent = await insert_customer(pool, org, uid("parent"))
    parent2 = await insert_customer(pool, org, uid("parent"))
    kids = [await insert_customer(pool, org, uid("kid"), parent_customer_id=parent["id"]) for _ in range(2)]
    kid2 = await insert_customer(pool, org, uid("kid"), parent_customer_id=parent2["id"])
    loner = await insert_customer(pool, org, uid("loner"))
    foreign = await insert_customer(pool, other_org, uid("foreign"))
    h = org.headers()

    def idset(*rows: dict) -> set[str]:
        return {str(r["id"]) for r in rows}

    page = await list_page(client, h, customer_ids=f"{kids[0]['id']},{loner['id']}")
    assert set(ids(page)) == idset(kids[0], loner)
    resp = await client.get(f"/v1/customers?customer_ids={kids[0]['id']}&customer_ids={kid2['id']}", headers=h)
    assert set(ids(await ok_json(resp))) == idset(kids[0], kid2)
    # another organization's id matches nothing
    assert ids(await list_page(client, h, customer_ids=str(foreign["id"]))) == []
    assert ids(await list_page(client, h, customer_ids=str(uuid.uuid4()))) == []

    page = await list_page(
        client, h, customer_identifiers=f"{loner['customer_identifier']},{parent['customer_identifier']}"
    )
    assert set(ids(page)) == idset(loner, parent)
    resp = await client.get(
        f"/v1/customers?customer_identifiers={kid2['customer_identifier']}"
        f"&customer_identifiers={foreign['customer_identifier']}",
        headers=h,
    )
    assert set(ids(await ok_json(resp))) == idset(kid2)

    assert set(ids(await list_page(client, h, parent_customer_ids=str(parent["id"])))) == idset(*kids)
    page = await list_page(client, h, parent_customer_ids=f"{parent['id']},{parent2['id']}")
    assert set(ids(page)) == idset(*kids, kid2)


async def test_range_filters_are_inclusive_and_skip_missing(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    t = [BASE + timedelta(days=d) for d in range(4)]
    rows = [
        await insert_customer(pool, org, uid(), first_seen=t[i], last_active=t[i] + timedelta(days=30), total_cost=c)
        for i, c in enumerate((Decimal("0"), Decimal("1.25"), Decimal("9.5"), Decimal("10.25")))
    ]
    missing = await insert_customer(pool, org, uid())
    h = org.headers()

    async def got(**params: Any) -> set[str]:
        return set(ids(await list_page(client, h, limit=100, **params)))

    def idx(*indexes: int) -> set[str]:
        return {str(rows[i]["id"]) for i in indexes}

    iso = lambda d: d.isoformat()  # noqa: E731
    assert await got(first_seen_gte=iso(t[1])) == idx(1, 2, 3)
    assert await got(first_seen_lte=iso(t[1])) == idx(0, 1)
    assert await got(first_seen_gte=iso(t[1]), first_seen_lte=iso(t[2])) == idx(1, 2)
    assert await got(first_seen_gte=iso(t[1] + timedelta(microseconds=1))) == idx(2, 3)
    # a time without a zone is ambiguous: refused, naming the parameter; a bare date is a UTC day
    naive = t[2].replace(tzinfo=None).isoformat()
    resp = await client.get("/v1/customers", params={"first_seen_gte": naive}, headers=h)
    body = await problem(resp, 400, "first_seen_gte")
    assert "time zone" in body["errors"][0]["detail"], body
    assert await got(first_seen_gte=t[2].date().isoformat()) == idx(2, 3)  # from midnight UTC of t[2]'s day
    # another offset, same instant
    shifted = t[2].astimezone(timezone(timedelta(hours=5))).isoformat()
    assert await got(first_seen_lte=shifted) == idx(0, 1, 2)
    la = [r["last_active"] for r in rows]
    assert await got(last_active_gte=iso(la[3])) == idx(3)
    assert await got(last_active_lte=iso(la[0])) == idx(0)
    assert await got(last_active_gte=iso(la[1]), last_active_lte=iso(la[2])) == idx(1, 2)
    # total_cost compares as a number (10.25 > 9.5), not as text
    assert await got(total_cost_gte="9.5") == idx(2, 3)
    assert await got(total_cost_gte="9.6") == idx(3)
    assert await got(total_cost_lte="1.25") == idx(0, 1) | {str(missing["id"])}
    assert await got(total_cost_gte="1.25", total_cost_lte="9.5") == idx(1, 2)
    assert str(missing["id"]) not in await got(first_seen_lte=iso(t[3]))
    assert str(missing["id"]) not in await got(last_active_gte="2000-01-01T00:00:00Z")


async def test_metadata_filter(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    pro_eu = await insert_customer(pool, org, uid(), metadata={"plan": "pro", "region": "eu", "n": 5})
    pro_us = await insert_customer(pool, org, uid(), metadata={"plan": "pro", "region": "us"})
    await insert_customer(pool, org, uid(), metadata={"plan": "free"})
    await insert_customer(pool, org, uid(), metadata={})
    h = org.headers()
    resp = await client.get("/v1/customers?metadata[plan]=pro", headers=h)
    assert set(ids(await ok_json(resp))) == {str(pro_eu["id"]), str(pro_us["id"])}
    resp = await client.get("/v1/customers?metadata[plan]=pro&metadata[region]=eu", headers=h)
    assert ids(await ok_json(resp)) == [str(pro_eu["id"])]
    resp = await client.get("/v1/customers?metadata[plan]=enterprise", headers=h)
    assert ids(await ok_json(resp)) == []
    resp = await client.get("/v1/customers?metadata[plan]=pro&metadata[plan]=free", headers=h)
    await problem(resp, 400, "metadata[plan]")


async def test_filters_combine(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    hit = await insert_customer(pool, org, uid(), name="Zed Hit", status="draft", total_cost=Decimal("5"))
    await insert_customer(pool, org, uid(), name="Zed Miss", status="active", total_cost=Decimal("5"))
    await insert_customer(pool, org, uid(), name="Zed Cheap", status="draft", total_cost=Decimal("1"))
    page = await list_page(client, org.headers(), name="zed", status="draft", total_cost_gte="2")
    assert ids(page) == [str(hit["id"])]
    assert page["count"] == 1


async def test_count_is_over_all_pages_of_the_filter(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    for i in range(9):
        await insert_customer(pool, org, uid(), status="draft" if i % 3 else "active")
    page = await list_page(client, org.headers(), status="draft", limit=2)
    assert page["count"] == 6 and len(page["results"]) == 2
    pages = await follow(client, page, org.headers())
    assert len(ids(pages)) == 6


# ---------------------------------------------------------------------------------------------
# expand / include.


async def _subscription(pool: asyncpg.Pool, org: Org, customer_id: uuid.UUID, sub_id: str, **plan: Any) -> None:
    """An active subscription for the 30 days from BASE."""
    await add_subscription(pool, org, customer_id, sub_id, "active", BASE, BASE + timedelta(days=30), plan)


async def test_expand_parent_customer(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    parent = await insert_customer(pool, org, uid("parent"), name="Parent Co", total_cost=Decimal("3.5"))
    child = await insert_customer(pool, org, uid("child"), parent_customer_id=parent["id"])
    h = org.headers()
    page = await list_page(client, h, expand="parent_customer", sort_by="customer_identifier", limit=10)
    CustomerList.model_validate(page)
    by_ident = {c["customer_identifier"]: c for c in page["results"]}
    embedded = by_ident[child["customer_identifier"]]["parent_customer"]
    assert embedded["id"] == str(parent["id"])
    assert embedded["name"] == "Parent Co" and embedded["total_cost"] == "3.5"
    assert by_ident[parent["customer_identifier"]]["parent_customer"] is None
    assert "parent_customer" in by_ident[parent["customer_identifier"]]
    # without expand there is no such key
    plain = await list_page(client, h)
    assert all("parent_customer" not in c and "subscriptions" not in c for c in plain["results"])
    # retrieve too
    resp = await client.get(f"/v1/customers/{child['customer_identifier']}?expand=parent_customer", headers=h)
    one = CustomerExpanded.model_validate(await ok_json(resp))
    assert one.parent_customer is not None and str(one.parent_customer.id) == str(parent["id"])


async def test_include_subscriptions(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    with_subs = await insert_customer(pool, org, uid("subs"))
    without = await insert_customer(pool, org, uid("nosubs"))
    first, second, third = uid("sub"), uid("sub"), uid("sub")
    await _subscription(
        pool,
        org,
        with_subs["id"],
        first,
        stripe_price_id="price_1",
        name="Pro",
        amount=4999,
        currency="usd",
        interval="month",
    )
    await _subscription(pool, org, with_subs["id"], second)  # no plan
    await _subscription(pool, org, with_subs["id"], third, name="Free tier", amount=0, currency="usd")  # no price id
    h = org.headers()
    page = await list_page(client, h, include="subscriptions", limit=10)
    CustomerList.model_validate(page)
    by_id = {c["id"]: c for c in page["results"]}
    assert by_id[str(without["id"])]["subscriptions"] == []
    subs = {s["id"]: s for s in by_id[str(with_subs["id"])]["subscriptions"]}
    assert set(subs) == {first, second, third}
    assert subs[first]["plan"] == {
        "stripe_price_id": "price_1",
        "name": "Pro",
        "amount": 4999,
        "currency": "usd",
        "interval": "month",
    }
    assert subs[first]["status"] == "active"
    assert datetime.fromisoformat(subs[first]["current_period_start"]) == BASE
    assert subs[second]["plan"] is None
    assert subs[third]["plan"] == {
        "stripe_price_id": None,
        "name": "Free tier",
        "amount": 0,
        "currency": "usd",
        "interval": None,
    }
    resp = await client.get(f"/v1/customers/{with_subs['customer_identifier']}?include=subscriptions", headers=h)
    assert len((await ok_json(resp))["subscriptions"]) == 3
    both = await list_page(client, h, include="subscriptions", expand="parent_customer")
    assert all("subscriptions" in c and "parent_customer" in c for c in both["results"])


# ---------------------------------------------------------------------------------------------
# Cursors that must be refused.


def _tamper_payload(cursor: str, edit) -> str:
    body, _, sig = cursor.partition(".")
    payload = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    edited = orjson.dumps(edit(payload))
    return base64.urlsafe_b64encode(edited).rstrip(b"=").decode() + "." + sig


@pytest.fixture
async def cursor_page(client: TestClient, twenty) -> tuple[Org, dict[str, Any]]:
    org, _ = twenty
    return org, await list_page(client, org.headers(), limit=5, sort_by="total_cost", status="active")


def _set(index: int, value: Any):
    def edit(payload: list) -> list:
        payload[index] = value
        return payload

    return edit


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda c: _tamper_payload(c, _set(5, "0")), id="payload-key"),
        pytest.param(lambda c: _tamper_payload(c, _set(3, "-total_cost")), id="payload-sort"),
        pytest.param(lambda c: _tamper_payload(c, _set(1, str(uuid.uuid4()))), id="payload-org"),
        pytest.param(
            # The signature's first character changed (it was compared with the last one: a
            # signature starting with "A" came back unchanged, one run in 64).
            lambda c: c.split(".")[0] + "." + ("A" if c.split(".")[1][0] != "A" else "B") + c.split(".")[1][1:],
            id="signature",
        ),
        pytest.param(lambda c: c.split(".")[0], id="no-signature"),
        pytest.param(lambda c: c + "x", id="appended"),
        pytest.param(lambda c: c[1:], id="truncated"),
        pytest.param(lambda c: "", id="empty"),
        pytest.param(lambda c: "not-a-cursor", id="garbage"),
        pytest.param(lambda c: "!!!.???", id="not-base64"),
        pytest.param(lambda c: "é.é", id="non-ascii"),
    ],
)
async def test_tampered_cursor_is_refused(client: TestClient, cursor_page, tamper) -> None:
    org, page = cursor_page
    bad = tamper(page["next_cursor"])
    assert bad != page["next_cursor"]
    resp = await client.get("/v1/customers", params={"cursor": bad, "status": "active"}, headers=org.headers())
    await problem(resp, 400, "cursor")


async def test_foreign_cursor_is_refused_without_data(client: TestClient, cursor_page, other_org: Org, pool) -> None:
    org, page = cursor_page
    await insert_customer(pool, other_org, uid(), status="active")
    resp = await client.get(
        "/v1/customers", params={"cursor": page["next_cursor"], "status": "active"}, headers=other_org.headers()
    )
    body = await problem(resp, 400, "cursor")
    assert "results" not in body
    # nor in another environment of the same organization
    params = {"cursor": page["next_cursor"], "status": "active"}
    await problem(await client.get("/v1/customers", params=params, headers=org.headers(org.test_key)), 400, "cursor")


@pytest.mark.parametrize(
    "params",
    [
        {},  # the status filter dropped
        {"status": "draft"},
        {"status": "active", "name": "x"},
        {"status": "active", "metadata[plan]": "pro"},
        {"status": "active", "sort_by": "-total_cost"},
        {"status": "active", "sort_by": "name"},
    ],
)
async def test_cursor_reused_with_other_filters_or_sort_is_refused(client: TestClient, cursor_page, params) -> None:
    org, page = cursor_page
    resp = await client.get("/v1/customers", params={"cursor": page["next_cursor"], **params}, headers=org.headers())
    await problem(resp, 400, "cursor")


async def test_cursor_with_same_filters_in_another_order_is_accepted(client: TestClient, pool, org: Org) -> None:
    for s in ("active", "draft", "archived"):
        for _ in range(3):
            await insert_customer(pool, org, uid(), status=s)
    h = org.headers()
    first = await list_page(client, h, limit=2, status="active,draft")
    resp = await client.get(f"/v1/customers?cursor={first['next_cursor']}&status=draft&status=active", headers=h)
    second = await ok_json(resp)
    assert len(second["results"]) == 4  # a cursor keeps the filters and sort, not the page size
    assert not set(ids(first)) & set(ids(second))
    assert second["count"] == 6


# ---------------------------------------------------------------------------------------------
# Usage series.


@pytest.fixture
async def usage_customer(pool: asyncpg.Pool, org: Org) -> tuple[Org, str]:
    row = await insert_customer(pool, org, uid("usage"))
    # Wednesday 2026-01-07 .. ; months: Jan, Feb, Mar
    for day, cost, requests in [
        (date(2025, 12, 31), "100", 100),  # before every window below
        (date(2026, 1, 5), "0.5", 1),  # Monday, outside a window starting on the 7th
        (date(2026, 1, 7), "1.25", 2),
        (date(2026, 1, 9), "2.5", 3),
        (date(2026, 1, 12), "0.0001", 4),  # next Monday
        (date(2026, 2, 1), "3", 5),
        (date(2026, 2, 28), "4", 6),
        (date(2026, 3, 10), "5", 7),
        (date(2026, 3, 11), "50", 8),  # after every window below
    ]:
        await add_daily_usage(pool, org, row["id"], day, cost, requests, latency=(requests * 1.5, requests))
    other = await insert_customer(pool, org, uid("usage-other"))
    await add_daily_usage(pool, org, other["id"], date(2026, 1, 7), "999", 999)
    return org, row["customer_identifier"]


async def _series(client: TestClient, org: Org, ident: str, **params: str) -> dict:
    resp = await client.get(f"/v1/customers/{ident}/usage", params=params, headers=org.headers())
    body = await ok_json(resp)
    UsageSeries.model_validate(body)
    assert body["customer_identifier"] == ident
    return body


async def test_usage_daily_is_zero_filled(client: TestClient, usage_customer) -> None:
    org, ident = usage_customer
    body = await _series(client, org, ident, **{"from": "2026-01-06", "to": "2026-01-10"})
    assert body["granularity"] == "day"
    points = body["results"]
    assert [p["start"] for p in points] == [f"2026-01-{d:02d}" for d in range(6, 11)]
    assert [Decimal(p["cost"]) for p in points] == [Decimal(0), Decimal("1.25"), Decimal(0), Decimal("2.5"), Decimal(0)]
    assert [p["requests"] for p in points] == [0, 2, 0, 3, 0]
    assert [p["total_tokens"] for p in points] == [0, 30, 0, 45, 0]
    assert points[1]["average_latency"] == pytest.approx(1.5)
    assert points[0]["average_latency"] is None
    one = await _series(client, org, ident, **{"from": "2026-01-07", "to": "2026-01-07"})
    assert len(one["results"]) == 1 and one["results"][0]["cost"] == "1.25"


async def test_usage_weekly_and_monthly_buckets(client: TestClient, usage_customer) -> None:
    org, ident = usage_customer
    weeks = await _series(client, org, ident, **{"from": "2026-01-07", "to": "2026-01-18", "granularity": "week"})
    assert [p["start"] for p in weeks["results"]] == ["2026-01-05", "2026-01-12"]
    # the first week counts only days from 'from' on (the 5th is outside the window)
    assert [Decimal(p["cost"]) for p in weeks["results"]] == [Decimal("3.75"), Decimal("0.0001")]
    assert [p["requests"] for p in weeks["results"]] == [5, 4]
    months = await _series(client, org, ident, **{"from": "2026-01-01", "to": "2026-03-10", "granularity": "month"})
    assert [p["start"] for p in months["results"]] == ["2026-01-01", "2026-02-01", "2026-03-01"]
    assert [Decimal(p["cost"]) for p in months["results"]] == [Decimal("4.2501"), Decimal("7"), Decimal("5")]
    assert [p["requests"] for p in months["results"]] == [10, 11, 7]
    assert months["results"][1]["average_latency"] == pytest.approx(1.5)


@pytest.mark.parametrize(
    "params, name",
    [
        ({"from": "2999-01-10"}, "to"),  # 'to' defaults to today: before 'from'
        ({"to": "1900-01-01"}, "from"),  # 'from' defaults to 29 days before 'to': out of range
        ({"from": "2026-01-10", "to": "2026-01-09"}, "to"),
        ({"from": "2026-01-xx", "to": "2026-01-09"}, "from"),
        ({"from": "2024-01-01", "to": "2026-01-01"}, "to"),
        ({"from": "2026-01-01", "to": "2026-01-09", "granularity": "hour"}, "granularity"),
        ({"from": "2026-01-01", "to": "2026-01-09", "bucket": "day"}, "bucket"),
    ],
)
async def test_usage_invalid_parameters(client: TestClient, usage_customer, params: dict, name: str) -> None:
    org, ident = usage_customer
    await problem(await client.get(f"/v1/customers/{ident}/usage", params=params, headers=org.headers()), 400, name)


async def test_usage_window_defaults_around_the_day_given(client: TestClient, usage_customer) -> None:
    org, ident = usage_customer
    body = await ok_json(
        await client.get(f"/v1/customers/{ident}/usage", params={"to": "2026-01-10"}, headers=org.headers())
    )
    assert (body["from"], body["to"], len(body["results"])) == ("2025-12-12", "2026-01-10", 30)


async def test_usage_unknown_or_foreign_customer_is_404(client: TestClient, usage_customer, other_org: Org) -> None:
    org, ident = usage_customer
    window = {"from": "2026-01-01", "to": "2026-01-02"}
    await problem(await client.get(f"/v1/customers/{uid()}/usage", params=window, headers=org.headers()), 404)
    await problem(await client.get(f"/v1/customers/{ident}/usage", params=window, headers=other_org.headers()), 404)
    resp = await client.get(f"/v1/customers/{ident}/usage", params=window, headers=org.headers(org.test_key))
    await problem(resp, 404)
    resp = await client.get(
        f"/v1/customers/{ident}/usage", params={**window, "environment": "test"}, headers=org.headers()
    )
    await problem(resp, 403, "environment")


def test_models_reject_a_wrong_document() -> None:
    """The response models are strict enough for the checks above to mean something."""
    with pytest.raises(ValidationError):
        CustomerList.model_validate(
            {"count": 1, "next": None, "previous": None, "next_cursor": None, "results": [{"id": "x"}]}
        )
