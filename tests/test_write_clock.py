"""API writes take effect whatever clock the upstream services keep: a write is stamped after
every change it replaces (a hybrid logical clock), so an upstream whose clock runs minutes
ahead cannot make fields un-editable, a DELETE always deletes and a POST after a
future-stamped deletion creates. The response is what is stored."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
from aiohttp.test_utils import TestClient

from tests.eventkit import cloud_event, fold_events
from tests.factories import Org
from tests.support import ok_json, problem, uid

AHEAD = timedelta(seconds=280)  # inside the 5 minutes an event may be ahead of the consumer's clock


def ahead(by: timedelta = AHEAD) -> datetime:
    return datetime.now(UTC) + by


async def upserted_ahead(pool: asyncpg.Pool, org: Org, ident: str, **fields: object) -> None:
    async with pool.acquire() as conn:
        assert await fold_events(conn, cloud_event(org.name, ident, "customer.upserted", fields, when=ahead())) == [
            "applied"
        ]


async def test_a_patch_after_a_future_stamped_upsert_takes_effect(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    ident = uid()
    await upserted_ahead(pool, org, ident, name="upstream", status="blacklisted")
    url = f"/v1/customers/{ident}"
    body = await ok_json(await client.patch(url, json={"name": "admin", "status": "active"}, headers=org.headers()))
    assert (body["name"], body["status"]) == ("admin", "active")
    stored = await ok_json(await client.get(url, headers=org.headers()))
    assert (stored["name"], stored["status"]) == ("admin", "active")


async def test_vendor_writes_after_a_future_stamped_upsert_take_effect(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    ident = uid()
    await upserted_ahead(pool, org, ident, name="upstream", email="up@example.com")
    respan = await client.patch(f"/compat/respan/api/users/{ident}/", json={"name": "respan"}, headers=org.headers())
    assert (await ok_json(respan))["name"] == "respan"
    flexprice = await client.put(
        "/compat/flexprice/v1/customers",
        params={"external_customer_id": ident},
        json={"email": "flex@example.com"},
        headers=org.headers(),
    )
    assert (await ok_json(flexprice))["email"] == "flex@example.com"
    stored = await ok_json(await client.get(f"/v1/customers/{ident}", headers=org.headers()))
    assert (stored["name"], stored["email"]) == ("respan", "flex@example.com")


async def test_a_delete_after_future_stamped_usage_deletes(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid()
    async with pool.acquire() as conn:
        usage = cloud_event(org.name, ident, "usage.recorded", {"requests": 5, "cost": "100"}, when=ahead())
        await fold_events(conn, usage)
    await upserted_ahead(pool, org, ident, name="upstream")
    assert (await client.delete(f"/v1/customers/{ident}", headers=org.headers())).status == 204
    await problem(await client.get(f"/v1/customers/{ident}", headers=org.headers()), 404)
    # Events stamped before the deletion (all of them, here) stay deleted when they come again late.
    async with pool.acquire() as conn:
        late = cloud_event(org.name, ident, "usage.recorded", {"requests": 1}, when=ahead(AHEAD / 2))
        assert await fold_events(conn, late) == ["stale"]
    await problem(await client.get(f"/v1/customers/{ident}", headers=org.headers()), 404)


async def test_a_create_after_a_future_stamped_deletion_creates(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    ident = uid()
    async with pool.acquire() as conn:
        deletion = cloud_event(org.name, ident, "customer.deleted", {}, when=ahead(timedelta(seconds=200)))
        assert await fold_events(conn, deletion) == ["applied"]
    resp = await client.post(
        "/v1/customers", json={"customer_identifier": ident, "name": "back"}, headers=org.headers()
    )
    assert (await ok_json(resp, 201))["name"] == "back"
    assert (await ok_json(await client.get(f"/v1/customers/{ident}", headers=org.headers())))["name"] == "back"


async def test_writes_stamped_now_when_nothing_is_ahead(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    """With every clock in step a write keeps its request time: a later event still wins."""
    ident = uid()
    before = datetime.now(UTC)
    await ok_json(await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers()), 201)
    await ok_json(await client.patch(f"/v1/customers/{ident}", json={"name": "api"}, headers=org.headers()))
    versions = await pool.fetchval(
        "SELECT profile_versions->>'name' FROM customers WHERE organization_id = $1 AND customer_identifier = $2",
        org.id,
        ident,
    )
    micros = int(versions.split("|")[1])
    stamped = datetime(1, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    assert before <= stamped <= datetime.now(UTC) + timedelta(seconds=1)
    async with pool.acquire() as conn:
        newer = cloud_event(
            org.name, ident, "customer.upserted", {"name": "upstream"}, when=ahead(timedelta(seconds=5))
        )
        assert await fold_events(conn, newer) == ["applied"]
    assert (await ok_json(await client.get(f"/v1/customers/{ident}", headers=org.headers())))["name"] == "upstream"
