"""Respan's own Python SDK (respan-api, the version pinned in pyproject.toml) against tally's
Respan route set, changed in nothing but its base URL and key: every users operation it
offers (list with its pager and filters, retrieve, update, delete), each response parsed into
the SDK's own models with the values tally holds. The SDK's async client runs on the test's
event loop, against the real app on a real TCP port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from respan import AsyncRespanClient
from respan.errors import BadRequestError, ForbiddenError, NotFoundError
from respan.types import Filters, FilterValue
from respan.users.types import ListCustomersResponseResultsItem, RetrieveUserResponse, UpdateUserResponse

from tests.factories import Org, insert_customer
from tests.support import uid


def sdk(client: TestClient, key: str) -> AsyncRespanClient:
    """The SDK as its README shows it, with tally's base URL and a tally key."""
    base_url = str(client.make_url("/compat/respan"))
    return AsyncRespanClient(base_url=base_url, authorization=f"Bearer {key}", respan_api_key=key)


@pytest.fixture
async def respan(client: TestClient, org: Org) -> AsyncIterator[AsyncRespanClient]:
    yield sdk(client, org.key)


SEEN = datetime(2025, 10, 15, 8, 0, tzinfo=UTC)
ACTIVE = datetime(2025, 12, 29, 10, 30, tzinfo=UTC)


async def five_users(pool: asyncpg.Pool, org: Org, prefix: str) -> list[dict]:
    rows = []
    for i in range(5):
        rows.append(
            await insert_customer(
                pool,
                org,
                f"{prefix}{i}",
                name=f"User {i}",
                email=f"u{i}@{'acme.dev' if i % 2 == 0 else 'other.io'}",
                first_seen=SEEN,
                last_active=ACTIVE,
                active_days=75 + i,
                number_of_requests=100 * i,
                prompt_tokens=10 * i,
                completion_tokens=5 * i,
                total_tokens=15 * i,
                total_cost=Decimal("2.5") * i,
                latency_sum=1.23 * (i + 1),
                latency_count=i + 1,
            )
        )
    return rows


async def test_list_pages_to_the_last_page_into_the_sdks_models(
    respan: AsyncRespanClient, pool: asyncpg.Pool, org: Org
) -> None:
    rows = await five_users(pool, org, "pg")
    pager = await respan.users.list_customers(page_size=2, sort_by="customer_identifier")
    assert pager.response.count == 5 and len(pager.items) == 2
    users = [u async for u in pager]  # the SDK's pager asks for pages until one comes back empty
    assert [u.customer_identifier for u in users] == [r["customer_identifier"] for r in rows]
    u = users[3]
    assert isinstance(u, ListCustomersResponseResultsItem)
    assert u.id == f"pg3prod{org.id}" and u.unique_organization_id == str(org.id)
    assert (u.name, u.email, u.environment) == ("User 3", "u3@other.io", "prod")
    assert (u.first_seen, u.last_active_timeframe) == (SEEN, ACTIVE)
    assert (u.active_days, u.number_of_requests, u.total_tokens) == (78, 300, 45)
    assert u.total_cost == 7.5 and u.average_latency == pytest.approx(1.23)
    # Descending, and the next/previous links of a middle page.
    middle = await respan.users.list_customers(page=2, page_size=2, sort_by="-total_cost")
    assert [u.customer_identifier for u in middle.items] == ["pg2", "pg1"]
    assert middle.response.next and "page=3" in middle.response.next
    assert middle.response.previous and "page=1" in middle.response.previous


async def test_list_filters(respan: AsyncRespanClient, pool: asyncpg.Pool, org: Org) -> None:
    await five_users(pool, org, "ft")

    async def names(filters: Filters) -> list[str]:
        pager = await respan.users.list_customers(sort_by="customer_identifier", filters=filters)
        return [u.customer_identifier async for u in pager if u.customer_identifier]

    # The docstring's own example: declared fields and extra ones, each {operator, value}.
    example = Filters(
        total_cost=FilterValue(operator="gte", value=[5]),
        email=FilterValue(operator="endswith", value=["@acme.dev"]),
    )
    assert await names(example) == ["ft2", "ft4"]
    as_dict = {
        "total_cost": {"operator": "gte", "value": [5]},
        "email": {"operator": "endswith", "value": ["@acme.dev"]},
    }
    assert await names(as_dict) == ["ft2", "ft4"]  # type: ignore[arg-type]  # the README's form
    assert await names(Filters(customer_identifier=FilterValue(operator="in", value=["ft0", "ft3", "zz"]))) == [
        "ft0",
        "ft3",
    ]
    assert await names(Filters(customer_identifier=FilterValue(value=["ft1"]))) == ["ft1"]  # "" is equals
    assert await names(Filters(total_tokens=FilterValue(operator="lt", value=[30]))) == ["ft0", "ft1"]
    assert await names(Filters(name=FilterValue(operator="icontains", value=["user 4"]))) == ["ft4"]
    assert await names(Filters(email=FilterValue(operator="not_endswith", value=["acme.dev"]))) == ["ft1", "ft3"]
    assert await names(Filters(active_days=FilterValue(operator="not", value=[75, 76]))) == ["ft2", "ft3", "ft4"]
    assert await names(Filters(number_of_requests=FilterValue(operator="gt", value=[250]))) == ["ft3", "ft4"]
    assert await names(Filters(total_prompt_tokens=FilterValue(operator="lte", value=[10]))) == ["ft0", "ft1"]
    assert await names(Filters(name=FilterValue(operator="not_empty", value=[""]))) == [f"ft{i}" for i in range(5)]
    # A range: a list of conditions on one field.
    ranged = Filters(
        total_cost=[FilterValue(operator="gt", value=[2.5]), FilterValue(operator="lt", value=[10])]  # type: ignore[arg-type]
    )
    assert await names(ranged) == ["ft2", "ft3"]
    # What tally cannot filter on is the SDK's BadRequestError, naming the field.
    with pytest.raises(BadRequestError) as caught:
        await respan.users.list_customers(filters=Filters(**{"metadata__plan": FilterValue(value=["pro"])}))
    assert caught.value.body["errors"][0]["name"] == "filters.metadata__plan"


async def test_retrieve_update_delete(respan: AsyncRespanClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("sdk")
    await insert_customer(pool, org, ident, name="John Doe", email="john@example.com", total_cost=Decimal("45.67"))
    got = (await respan.users.with_raw_response.retrieve_user(ident)).data
    assert isinstance(got, RetrieveUserResponse)
    assert (got.id, got.customer_identifier, got.name, got.email, got.environment) == (
        ident,
        ident,
        "John Doe",
        "john@example.com",
        "prod",
    )
    assert got.organization_name == org.name and got.total_period_usage == 45.67 and got.budget_duration is None
    assert await respan.users.retrieve_user(ident, environment="prod") == got

    updated = await respan.users.update_user(
        ident,
        name="Jane Doe",
        email="jane@example.com",
        metadata={"plan": "pro", "seats": 5},
        total_budget=1000,
        period_budget=100,
        budget_duration="monthly",
    )
    assert isinstance(updated, UpdateUserResponse)
    assert (updated.name, updated.email, updated.total_budget, updated.period_budget) == (
        "Jane Doe",
        "jane@example.com",
        1000,
        100,
    )
    assert updated.budget_duration == "monthly" and updated.period_start is not None and updated.period_end is not None
    stored = await pool.fetchval(
        "SELECT metadata FROM customers WHERE organization_id = $1 AND customer_identifier = $2", org.id, ident
    )
    assert stored == {"plan": "pro", "seats": 5}
    # What tally cannot hold is refused, not dropped.
    with pytest.raises(BadRequestError):
        await respan.users.update_user(ident, markup_percentage=10)

    await respan.users.delete_user(ident)
    with pytest.raises(NotFoundError):
        await respan.users.retrieve_user(ident)
    with pytest.raises(NotFoundError):
        await respan.users.delete_user(ident)


async def test_a_key_reaches_its_environment_only(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    await insert_customer(pool, org, uid("prodonly"))
    test_ident = uid("testonly")
    await insert_customer(pool, org, test_ident, environment="test")
    test_sdk = sdk(client, org.test_key)
    listed = [u async for u in await test_sdk.users.list_customers()]
    assert [(u.customer_identifier, u.environment) for u in listed] == [(test_ident, "test")]
    # A customer the list returns is one retrieve finds, with no environment named.
    assert (await test_sdk.users.retrieve_user(test_ident)).environment == "test"
    # Naming the key's own environment is allowed; the other one is refused (a key reaches its
    # own environment only), surfaced by the SDK as its typed ForbiddenError.
    named = [u.environment async for u in await test_sdk.users.list_customers(environment="test")]
    assert named == ["test"]
    with pytest.raises(ForbiddenError):
        await test_sdk.users.list_customers(environment="prod")
    with pytest.raises(ForbiddenError):
        await test_sdk.users.retrieve_user(test_ident, environment="prod")
