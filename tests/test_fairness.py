"""Fair sharing of the database between organizations: one tenant's
slow requests never queue another's without end. Requests whose database work we hold
still (a PATCH waiting on a customer row a test connection has locked) stand in for the
probe's 32 slow lists: the outcome is asserted, never a duration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from aiohttp.test_utils import TestClient, TestServer

from service.api import appkeys
from service.api.app import create_app
from service.infra.settings import Settings
from service.web.app import base_app
from tests.eventkit import wait_until
from tests.factories import Org, insert_customer
from tests.support import ok_json, problem, uid

LOCK_ROW = (
    "SELECT 1 FROM customers WHERE organization_id = $1 AND customer_identifier = $2 AND environment = 'prod'"
    " FOR UPDATE"
)
LOCK_WAITERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    " AND pid <> pg_backend_pid()"
)


@asynccontextmanager
async def row_locked(pool: asyncpg.Pool, org: Org, identifier: str) -> AsyncIterator[None]:
    """Hold ``identifier``'s row lock (as a long fold would) until the block exits."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(LOCK_ROW, org.id, identifier)
        yield


async def lock_waiters_reach(pool: asyncpg.Pool, count: int) -> None:
    async def waiting() -> bool:
        return await pool.fetchval(LOCK_WAITERS) >= count

    await wait_until(waiting, timeout=10, what=f"{count} request(s) waiting on a row lock")


async def no_lock_waiters(pool: asyncpg.Pool) -> None:
    async def none() -> bool:
        return await pool.fetchval(LOCK_WAITERS) == 0

    await wait_until(none, timeout=10, what="no statement left waiting on a row lock")


def patch_name(client: TestClient, org: Org, identifier: str) -> asyncio.Future:
    return asyncio.ensure_future(
        client.patch(f"/v1/customers/{identifier}", json={"name": uid("n")}, headers=org.headers())
    )


async def test_a_busy_organization_is_shed_and_others_are_served(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    fair = settings.model_copy(update={"db_pool_max": 4, "db_org_concurrency": 1, "db_acquire_timeout": 0.5})
    a_customer = uid("a")
    await insert_customer(pool, org, a_customer)
    b_customer = uid("b")
    await insert_customer(pool, other_org, b_customer)
    async with TestClient(TestServer(create_app(fair))) as client:
        async with row_locked(pool, org, a_customer):
            # A's one database turn is taken by a request stuck in PostgreSQL.
            held = patch_name(client, org, a_customer)
            await lock_waiters_reach(pool, 1)

            # Another organization is served as if A were idle ...
            body = await ok_json(await client.get(f"/v1/customers/{b_customer}", headers=other_org.headers()))
            assert body["customer_identifier"] == b_customer
            await ok_json(await client.get("/v1/customers", headers=other_org.headers()))

            # ... while A's further requests are shed, not queued.
            for path in ("/v1/customers", f"/v1/customers/{a_customer}"):
                resp = await client.get(path, headers=org.headers())
                body = await problem(resp, 503)
                assert int(resp.headers["Retry-After"]) >= 1
                assert "organization" in body["detail"]
        assert (await held).status == 200
        # A's turn is back once its work finished.
        await ok_json(await client.get(f"/v1/customers/{a_customer}", headers=org.headers()))


async def test_waiting_for_a_pool_connection_is_bounded(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    """Every pooled connection is held by slow work: a request gets a 503 with Retry-After
    after TALLY_DB_ACQUIRE_TIMEOUT, rather than waiting without end."""
    tiny = settings.model_copy(
        update={"db_pool_min": 1, "db_pool_max": 2, "db_org_concurrency": 2, "db_acquire_timeout": 0.5}
    )
    first, second = uid("a"), uid("a")
    for identifier in (first, second):
        await insert_customer(pool, org, identifier)
    async with TestClient(TestServer(create_app(tiny))) as client:
        # The other organization's key is verified (and cached) while the pool is free.
        await ok_json(await client.get("/v1/customers", headers=other_org.headers()))
        async with row_locked(pool, org, first), row_locked(pool, org, second):
            held = [patch_name(client, org, first), patch_name(client, org, second)]
            await lock_waiters_reach(pool, 2)
            resp = await client.get("/v1/customers", headers=other_org.headers())
            body = await problem(resp, 503)
            assert int(resp.headers["Retry-After"]) >= 1
            assert "connection" in body["detail"]
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
        await ok_json(await client.get("/v1/customers", headers=other_org.headers()))


async def test_the_api_pool_stops_statements_in_postgresql(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org
) -> None:
    """TALLY_DB_COMMAND_TIMEOUT is also the API sessions' statement_timeout, so a statement
    the client gave up on does not keep a backend busy; such a request is a 503, never a 500.
    A consumer's pool (base_app without a statement timeout) is left as it was."""
    quick = settings.model_copy(update={"db_command_timeout": 1.0})
    identifier = uid("a")
    await insert_customer(pool, org, identifier)
    app = create_app(quick)
    async with TestClient(TestServer(app)) as client:
        assert await app[appkeys.POOL].fetchval("SHOW statement_timeout") == "1s"
        async with row_locked(pool, org, identifier):
            resp = await patch_name(client, org, identifier)
            await problem(resp, 503)
            assert resp.headers["Retry-After"]
            await no_lock_waiters(pool)  # the backend stopped: nothing is left behind while the lock is held
    consumer_like = base_app(quick)
    async with TestClient(TestServer(consumer_like)):
        assert await consumer_like[appkeys.POOL].fetchval("SHOW statement_timeout") == "0"
