"""What marks a dependency down, and what is said about it: a slow read (one tenant's
expensive filter running past the statement timeout) and a read pool filled by slow reads are
the requests' problem, never the standby's; reads keep going to the standby for everyone else.
A read URL that is not a standby, and a broker node that is down by design, are said once.

The "standby" here is the test database itself behind TALLY_DATABASE_READ_URL: the health
logic is the same for any server (a primary merely logs, once, that it is not in recovery),
and no replication is needed to show what the checks conclude. tests/test_standby.py (faults)
runs the same code against a real streaming standby."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.api import dbaccess
from service.api.app import create_app
from service.infra.broker import BrokerNodes
from service.infra.settings import Settings
from tests.eventkit import AMQP_URL, wait_until
from tests.factories import Org, insert_customer
from tests.processes import free_port
from tests.support import ok_json, problem, uid, with_user


@asynccontextmanager
async def usage_locked(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Hold customer_usage's ACCESS EXCLUSIVE lock: every read of a customer waits behind it."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE customer_usage IN ACCESS EXCLUSIVE MODE")
        yield


async def checks_pass(app, count: int) -> None:
    standby = app[dbaccess.STANDBY]
    target = standby.checks + count

    async def done() -> bool:
        return standby.checks >= target

    await wait_until(done, timeout=10, what=f"{count} more standby checks")


def read_standby(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(
        update={"database_read_url": settings.database_url, "database_read_check_interval": 0.05, **changes}
    )


async def test_a_read_past_its_statement_timeout_does_not_mark_the_standby_down(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tally.standby")
    identifier = uid()
    await insert_customer(pool, org, identifier)
    app = create_app(read_standby(settings, db_command_timeout=0.5))
    async with TestClient(TestServer(app)) as client:
        standby = app[dbaccess.STANDBY]
        assert standby.up
        async with usage_locked(pool):
            for _ in range(3):
                resp = await client.get(f"/v1/customers/{identifier}", headers=org.headers())
                await problem(resp, 503)
                assert resp.headers["Retry-After"]
            await checks_pass(app, 3)
            assert standby.up
        body = await ok_json(await client.get(f"/v1/customers/{identifier}", headers=org.headers()))
        assert body["customer_identifier"] == identifier
        assert standby.up
    assert not [r for r in caplog.records if "standby down" in r.getMessage()]


async def test_a_read_pool_full_of_slow_reads_does_not_mark_the_standby_down(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org
) -> None:
    identifier = uid()
    await insert_customer(pool, org, identifier)
    # Every pooled connection is one organization's: its slow reads fill the read pool. The read
    # cache is off: with it, the same read requested twice at once is read once (and shared).
    app = create_app(read_standby(settings, db_pool_max=2, db_org_concurrency=2, db_acquire_timeout=5, read_cache_mb=0))
    async with TestClient(TestServer(app)) as client:
        standby = app[dbaccess.STANDBY]
        async with usage_locked(pool):
            slow = [
                asyncio.ensure_future(client.get(f"/v1/customers/{identifier}", headers=org.headers()))
                for _ in range(2)
            ]

            async def pool_full() -> bool:
                return standby.pool.get_size() == 2 and standby.pool.get_idle_size() == 0

            await wait_until(pool_full, timeout=10, what="the read pool full of waiting reads")
            await checks_pass(app, 5)
            assert standby.up
        assert [r.status for r in await asyncio.gather(*slow)] == [200, 200]


async def test_a_database_out_of_connections_is_a_503(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org
) -> None:
    """PostgreSQL refusing a new connection (too many connections: here a role's CONNECTION
    LIMIT, reached for real) is transient, as the consumer treats it: 503 with Retry-After,
    not 500."""
    identifier = uid()
    await insert_customer(pool, org, identifier)
    role = f"tally_tiny_{uid()}"
    await pool.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE pg_read_all_data, pg_write_all_data')
    try:
        # The read cache off: with it, the second read would wait for the first's (the same read
        # requested twice at once is read once) instead of asking for a connection of its own.
        app = create_app(
            settings.model_copy(update={"database_url": with_user(settings.database_url, role), "read_cache_mb": 0})
        )
        async with TestClient(TestServer(app)) as client:
            # The connections the API holds once started are all the role may have.
            held = await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role)
            await pool.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT {held}')
            async with usage_locked(pool):
                waiting = asyncio.ensure_future(client.get(f"/v1/customers/{identifier}", headers=org.headers()))

                async def pool_connection_waits() -> bool:
                    return bool(
                        await pool.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND wait_event_type = 'Lock'",
                            role,
                        )
                    )

                await wait_until(pool_connection_waits, timeout=10, what="a read holding the pool's connection")
                resp = await client.get(f"/v1/customers/{identifier}", headers=org.headers())
                body = await problem(resp, 503)
                assert resp.headers["Retry-After"] == "1"
                assert body["title"] == "Service Unavailable"
            assert (await waiting).status == 200
    finally:
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND pid <> pg_backend_pid()",
            role,
        )
        await pool.execute(f'DROP ROLE "{role}"')


async def test_a_read_url_that_is_not_a_standby_is_said_once(
    settings: Settings, migrated, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tally.standby")
    app = create_app(read_standby(settings))
    async with TestClient(TestServer(app)):
        await checks_pass(app, 10)
        assert app[dbaccess.STANDBY].up
    said = [r for r in caplog.records if "not in recovery" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


@pytest.mark.services  # the real broker, as the live node
async def test_a_broker_node_down_by_design_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """A cluster node that is down (here: a port nobody listens on, listed first) is logged
    when it becomes unreachable, once, however often clients fail over past it; aiormq's own
    ERROR line for each failed attempt is not an ERROR."""
    caplog.set_level(logging.DEBUG)
    nodes = BrokerNodes(f"amqp://guest:guest@127.0.0.1:{free_port()}/,{AMQP_URL}")
    for _ in range(4):
        connection = await nodes.connect(timeout=5)
        await connection.close()
        nodes.lost()  # the next attempt starts at the dead node again (two nodes: it wraps)
        nodes.lost()
    assert [r.levelno for r in caplog.records if "unreachable" in r.getMessage()] == [logging.WARNING]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
