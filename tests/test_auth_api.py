"""Authentication, scopes and tenant isolation on the canonical routes."""

from __future__ import annotations

import secrets
from decimal import Decimal

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from service.store import auth
from tests.eventkit import wait_until
from tests.factories import Org, insert_customer
from tests.support import ids, list_page, ok_json, problem, uid

WINDOW = "from=2026-01-01&to=2026-01-02"


async def unauthenticated(resp) -> dict:
    body = await problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].lower().startswith("bearer")
    return body


def _swap_secret(key: str) -> str:
    client_key, _, _ = key.partition(".")
    return f"{client_key}.{secrets.token_urlsafe(32)}"


BAD_AUTHORIZATION = [
    pytest.param("Bearer", id="bearer-no-token"),
    pytest.param("Bearer ", id="bearer-blank"),
    pytest.param("Basic dXNlcjpwYXNz", id="basic"),
    pytest.param("Token abc.def", id="other-scheme"),
    pytest.param("tly_0123456789ab.secret", id="no-scheme"),
    pytest.param("Bearer tly_0123456789absecret", id="no-dot"),
    pytest.param("Bearer tly_0123456789ab.", id="empty-secret"),
    pytest.param("Bearer .secret", id="empty-client-key"),
    pytest.param("Bearer sk_0123456789ab.secret", id="wrong-prefix"),
    pytest.param("Bearer tly_000000000000.secret", id="unknown-key"),
]


async def test_missing_credentials(client: TestClient) -> None:
    await unauthenticated(await client.get("/v1/customers"))
    await unauthenticated(await client.get(f"/v1/customers/{uid()}"))
    await unauthenticated(await client.post("/v1/customers", json={"customer_identifier": uid()}))


@pytest.mark.parametrize("header", BAD_AUTHORIZATION)
async def test_bad_authorization_header(client: TestClient, header: str) -> None:
    await unauthenticated(await client.get("/v1/customers", headers={"Authorization": header}))


async def test_wrong_secret(client: TestClient, org: Org) -> None:
    await unauthenticated(await client.get("/v1/customers", headers=org.headers(_swap_secret(org.key))))
    # the secret of another key of the same organization does not fit either
    mixed = org.key.partition(".")[0] + "." + org.read_key.partition(".")[2]
    await unauthenticated(await client.get("/v1/customers", headers=org.headers(mixed)))


async def test_revoked_key(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    h = org.headers(org.read_key)
    await ok_json(await client.get("/v1/customers", headers=h))
    async with pool.acquire() as conn:
        await auth.revoke_key(conn, org.read_key)

    # The API caches verified keys for 30 s; the revocation's NOTIFY evicts the key as it
    # commits, so it takes effect within the notification's delivery, far inside the TTL.
    async def refused() -> bool:
        return (await client.get("/v1/customers", headers=h)).status == 401

    await wait_until(refused, timeout=5, interval=0.01, what="revocation to take effect")
    await unauthenticated(await client.get("/v1/customers", headers=h))
    client_key, _, secret = org.read_key.partition(".")
    await unauthenticated(
        await client.get("/v1/customers", headers={"x-client-key": client_key, "x-client-secret": secret})
    )
    # other keys of the organization still work
    await ok_json(await client.get("/v1/customers", headers=org.headers()))


async def test_bearer_scheme_is_case_insensitive(client: TestClient, org: Org) -> None:
    await ok_json(await client.get("/v1/customers", headers={"Authorization": f"bearer {org.key}"}))


async def test_client_key_header_pair(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    row = await insert_customer(pool, org, uid())
    client_key, _, secret = org.key.partition(".")
    page = await ok_json(
        await client.get("/v1/customers", headers={"x-client-key": client_key, "x-client-secret": secret})
    )
    assert ids(page) == [str(row["id"])]
    # the pair can write too (it is the same credential)
    resp = await client.post(
        "/v1/customers",
        json={"customer_identifier": uid()},
        headers={"x-client-key": client_key, "x-client-secret": secret},
    )
    await ok_json(resp, 201)
    await unauthenticated(await client.get("/v1/customers", headers={"x-client-key": client_key}))
    await unauthenticated(
        await client.get("/v1/customers", headers={"x-client-key": client_key, "x-client-secret": ""})
    )
    await unauthenticated(
        await client.get("/v1/customers", headers={"x-client-key": client_key, "x-client-secret": secret + "x"})
    )
    await unauthenticated(
        await client.get("/v1/customers", headers={"x-client-key": "tly_ffffffffffff", "x-client-secret": secret})
    )


async def test_read_only_key_cannot_write(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid()
    await insert_customer(pool, org, ident, name="orig")
    h = org.headers(org.read_key)
    await problem(await client.post("/v1/customers", json={"customer_identifier": uid()}, headers=h), 403)
    await problem(await client.patch(f"/v1/customers/{ident}", json={"name": "x"}, headers=h), 403)
    await problem(await client.delete(f"/v1/customers/{ident}", headers=h), 403)
    # reads work, and nothing changed
    doc = await ok_json(await client.get(f"/v1/customers/{ident}", headers=h))
    assert doc["name"] == "orig"
    await ok_json(await client.get(f"/v1/customers/{ident}/usage?{WINDOW}", headers=h))
    assert (await list_page(client, h))["count"] == 1
    # the scope is checked before the body: an invalid body from a read-only key is still 403
    await problem(await client.post("/v1/customers", data=b"not json", headers=h), 403)


async def test_test_environment_key_sees_only_its_environment(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    prod = await insert_customer(pool, org, uid())
    test = await insert_customer(pool, org, uid(), environment="test")
    h = org.headers(org.test_key)
    assert ids(await list_page(client, h)) == [str(test["id"])]
    await problem(await client.get(f"/v1/customers/{prod['customer_identifier']}", headers=h), 404)
    await ok_json(await client.get(f"/v1/customers/{test['customer_identifier']}", headers=h))


async def test_another_organizations_customer_is_404(
    client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    ident = uid("a")
    mine = await insert_customer(pool, org, ident, name="A's", total_cost=Decimal("3"))
    await pool.execute(
        "INSERT INTO daily_usage (organization_id, customer_id, day, cost) VALUES ($1, $2, '2026-01-01', 1)",
        org.id,
        mine["id"],
    )
    theirs = await insert_customer(pool, other_org, uid("b"))
    b = other_org.headers()
    for key in (other_org.key, other_org.read_key):
        await problem(await client.get(f"/v1/customers/{ident}", headers=other_org.headers(key)), 404)
        await problem(await client.get(f"/v1/customers/{ident}/usage?{WINDOW}", headers=other_org.headers(key)), 404)
    await problem(await client.patch(f"/v1/customers/{ident}", json={"name": "stolen"}, headers=b), 404)
    await problem(await client.delete(f"/v1/customers/{ident}", headers=b), 404)
    # A's customer is untouched
    doc = await ok_json(await client.get(f"/v1/customers/{ident}", headers=org.headers()))
    assert doc["name"] == "A's"
    # and never appears in B's lists, whatever B filters on
    page = await list_page(client, b, limit=1000)
    assert ids(page) == [str(theirs["id"])] and page["count"] == 1
    for params in (
        {"customer_ids": str(mine["id"])},
        {"customer_identifiers": ident},
        {"name": "A's"},
        {"environment": "prod"},
        {"total_cost_gte": "3"},
    ):
        page = await list_page(client, b, **params)
        assert str(mine["id"]) not in ids(page)
    # B creating the same identifier makes B's own customer
    resp = await client.post("/v1/customers", json={"customer_identifier": ident, "name": "B's"}, headers=b)
    created = await ok_json(resp, 201)
    assert created["id"] != str(mine["id"])
    assert (await ok_json(await client.get(f"/v1/customers/{ident}", headers=org.headers())))["name"] == "A's"


async def test_a_foreign_parent_is_never_embedded(
    client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    foreign = await insert_customer(pool, other_org, uid())
    # A row pointing at another organization's id cannot even be stored (the key includes the tenant)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await insert_customer(pool, org, uid(), parent_customer_id=foreign["id"])


async def test_error_responses_carry_the_request_id(client: TestClient, org: Org) -> None:
    resp = await client.get("/v1/customers?limit=0", headers={**org.headers(), "X-Request-ID": "req-123.abc"})
    body = await problem(resp, 400, "limit")
    assert body["request_id"] == "req-123.abc" and resp.headers["X-Request-ID"] == "req-123.abc"
    resp = await client.get("/v1/customers", headers={"X-Request-ID": "bad id with spaces"})
    body = await problem(resp, 401)
    assert body["request_id"] == resp.headers["X-Request-ID"] != "bad id with spaces"


async def test_unknown_route_and_method_are_problems(client: TestClient, org: Org) -> None:
    await problem(await client.get("/v1/nothing-here", headers=org.headers()), 404)
    resp = await client.put("/v1/customers", json={}, headers=org.headers())
    await problem(resp, 405)
    assert "GET" in resp.headers["Allow"] and "POST" in resp.headers["Allow"]
