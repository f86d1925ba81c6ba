"""Flexprice's own Python SDK (flexprice, the version pinned in pyproject.toml) against
tally's Flexprice route set, changed in nothing but its server URL and key (sent as
``x-api-key``, as the SDK does): every customers operation tally can serve (query, get, get by
external id, create, update, delete), each response parsed into the SDK's own models with
the values tally holds, metadata that is not all strings included. The SDK's async methods
run on the test's event loop, against the real app on a real TCP port."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from flexprice import Flexprice, models
from flexprice.models import errors

from tests.factories import Org, insert_customer, set_columns
from tests.support import uid


def sdk(client: TestClient, key: str) -> Flexprice:
    """The SDK as its README shows it, with tally's server URL and a tally key."""
    return Flexprice(api_key_auth=key, server_url=str(client.make_url("/compat/flexprice/v1")))


@pytest.fixture
def flexprice(client: TestClient, org: Org) -> Flexprice:
    return sdk(client, org.key)


BASE = datetime(2025, 1, 1, tzinfo=UTC)


async def three_customers(pool: asyncpg.Pool, org: Org, prefix: str) -> list[dict]:
    rows = []
    for i, (status, metadata) in enumerate(
        [
            ("active", {"plan_tier": "enterprise"}),
            # What the SDK's Dict[str, str] used to reject, failing the whole page.
            ("draft", {"beta": True, "seats": 5, "limits": {"rpm": 60}}),
            ("blacklisted", {}),
        ]
    ):
        row = await insert_customer(
            pool, org, f"{prefix}{i}", name=f"Acme {i}", email=f"billing{i}@acme.com", status=status, metadata=metadata
        )
        rows.append(
            await set_columns(
                pool, row, created_at=BASE + timedelta(days=i), address_city="San Francisco", address_country="US"
            )
        )
    return rows


async def test_query_customers_into_the_sdks_models(flexprice: Flexprice, pool: asyncpg.Pool, org: Org) -> None:
    rows = await three_customers(pool, org, "q")
    page = await flexprice.customers.query_customer_async()
    assert isinstance(page, models.ListCustomersResponse)
    assert page.pagination is not None and (page.pagination.total, page.pagination.limit) == (3, 50)
    assert page.items is not None
    assert [c.external_id for c in page.items] == ["q2", "q1", "q0"]  # newest first
    c = {c.external_id: c for c in page.items}
    first = c["q0"]
    assert isinstance(first, models.CustomerResponse)
    assert (first.id, first.name, first.email) == (str(rows[0]["id"]), "Acme 0", "billing0@acme.com")
    assert (first.address_city, first.address_country, first.address_line2) == ("San Francisco", "US", "")
    assert (first.environment_id, first.tenant_id, first.status) == ("prod", str(org.id), "published")
    assert first.created_at == BASE and first.updated_at is not None
    assert first.metadata == {"plan_tier": "enterprise"}
    assert c["q1"].metadata == {"beta": "true", "seats": "5", "limits": '{"rpm": 60}'}
    assert (c["q1"].status, c["q2"].status) == ("published", "archived")  # tally's draft, blacklisted

    async def ids(**kwargs: object) -> list[str | None]:
        found = await flexprice.customers.query_customer_async(**kwargs)  # type: ignore[arg-type]
        return [x.external_id for x in found.items or []]

    assert await ids(limit=1, offset=1) == ["q1"]
    assert await ids(order="asc") == ["q0", "q1", "q2"]
    assert await ids(sort=[models.SortCondition(field="name", direction="asc")]) == ["q0", "q1", "q2"]
    assert await ids(sort=[{"field": "external_id", "direction": "desc"}], limit=2) == ["q2", "q1"]
    assert await ids(external_ids=["q0", "q2"], order="asc") == ["q0", "q2"]
    assert await ids(external_id="q1") == ["q1"]
    assert await ids(customer_ids=[str(rows[2]["id"])]) == ["q2"]
    assert await ids(email="billing1@acme.com") == ["q1"]
    assert await ids(metadata={"plan_tier": "enterprise"}) == ["q0"]
    assert await ids(status="published", order="asc") == ["q0", "q1"]
    assert await ids(status="archived") == ["q2"]
    assert await ids(status="deleted") == []
    assert await ids(start_time=BASE + timedelta(days=1), end_time=BASE + timedelta(days=1)) == ["q1"]
    contains = models.FilterCondition(field="name", operator="contains", data_type="string", value={"string": "e 2"})
    assert await ids(filters=[contains]) == ["q2"]
    after = models.FilterCondition(field="created_at", operator="after", data_type="date", value={"date": "2025-01-02"})
    assert await ids(filters=[after]) == ["q2"]
    listed = models.FilterCondition(field="external_id", operator="in", data_type="array", value={"array": ["q0"]})
    assert await ids(filters=[listed]) == ["q0"]
    # tally's errors are problem+json, which the SDK raises as its FlexpriceError (status and body).
    with pytest.raises(errors.FlexpriceError) as caught:
        await flexprice.customers.query_customer_async(sort=[{"field": "shoe_size", "direction": "asc"}])
    assert caught.value.status_code == 400 and "sort.0.field" in caught.value.body


async def test_get_and_get_by_external_id(flexprice: Flexprice, pool: asyncpg.Pool, org: Org, other_org: Org) -> None:
    rows = await three_customers(pool, org, "g")
    one = await flexprice.customers.get_customer_async(id=str(rows[1]["id"]))
    assert isinstance(one, models.CustomerResponse)
    assert (one.external_id, one.name, one.status) == ("g1", "Acme 1", "published")
    assert one.metadata == {"beta": "true", "seats": "5", "limits": '{"rpm": 60}'}
    by_external = await flexprice.customers.get_customer_by_external_id_async(external_id="g1")
    assert by_external == one
    for missing in (str(uuid.uuid4()), "cust_abc123xyz789"):
        with pytest.raises(errors.FlexpriceError) as caught:
            await flexprice.customers.get_customer_async(id=missing)
        assert caught.value.status_code == 404
    with pytest.raises(errors.FlexpriceError) as caught:
        await flexprice.customers.get_customer_by_external_id_async(external_id="nobody")
    assert caught.value.status_code == 404
    # Another organization's key finds nothing.
    with pytest.raises(errors.FlexpriceError):
        await sdk_for(flexprice, other_org).customers.get_customer_async(id=str(rows[1]["id"]))


def sdk_for(base: Flexprice, org: Org) -> Flexprice:
    return Flexprice(api_key_auth=org.key, server_url=base.sdk_configuration.server_url)


async def test_create_update_delete(flexprice: Flexprice, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("flex")
    created = await flexprice.customers.create_customer_async(
        external_id=ident, name="Acme Corporation", email="billing@acme.com", address_city="Austin", metadata={"t": "1"}
    )
    assert isinstance(created, models.CustomerResponse)
    assert (created.external_id, created.name, created.address_city, created.metadata) == (
        ident,
        "Acme Corporation",
        "Austin",
        {"t": "1"},
    )
    assert created.status == "published" and created.id is not None

    updated = await flexprice.customers.update_customer_async(
        id=created.id, name="Acme Inc", contact="+1 555", address_line2="Suite 200", metadata={"plan_tier": "growth"}
    )
    assert (updated.name, updated.address_line2, updated.address_city) == ("Acme Inc", "Suite 200", "Austin")
    assert updated.metadata == {"plan_tier": "growth"}
    stored = await pool.fetchrow("SELECT phone, metadata FROM customers WHERE id = $1", uuid.UUID(created.id))
    assert (stored["phone"], stored["metadata"]) == ("+1 555", {"plan_tier": "growth"})
    by_external = await flexprice.customers.update_customer_async(external_customer_id=ident, email="ap@acme.com")
    assert (by_external.id, by_external.email, by_external.name) == (created.id, "ap@acme.com", "Acme Inc")
    # A field tally cannot hold is refused, not dropped.
    with pytest.raises(errors.FlexpriceError) as caught:
        await flexprice.customers.update_customer_async(id=created.id, timezone="Asia/Kolkata")
    assert caught.value.status_code == 400 and "timezone" in caught.value.body

    await flexprice.customers.delete_customer_async(id=created.id)
    with pytest.raises(errors.FlexpriceError):
        await flexprice.customers.get_customer_async(id=created.id)
    with pytest.raises(errors.FlexpriceError):
        await flexprice.customers.delete_customer_async(id=created.id)


async def test_the_key_only_as_x_api_key(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    row = await insert_customer(pool, org, uid("test"), environment="test")
    test_sdk = sdk(client, org.test_key)
    page = await test_sdk.customers.query_customer_async()
    assert [c.id for c in page.items or []] == [str(row["id"])]  # the key's environment
    with pytest.raises(errors.FlexpriceError) as caught:
        await sdk(client, "tly_unknown.key").customers.query_customer_async()
    assert caught.value.status_code == 401
