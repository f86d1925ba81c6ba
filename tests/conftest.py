"""Every fixture shared by more than one test module, registered once, here: a fresh database
per test session against the real PostgreSQL, migrated by the real migrator; the API under
a test client; unique organizations per test so tests need no cleanup; a private namespace
on the real RabbitMQ per test, the consumer processes a test starts, an HTTP session for
them; and the read-only data the compatibility tests share.

Helpers live in modules of their own, never in a test module: factories.py (rows),
support.py (API responses, databases), schemacheck.py, eventkit.py (events, the broker),
consumerkit.py (the consumer in-process), processes.py (consumer processes), compatkit.py
(the vendors' docs). Fixtures used by one module only stay in that module."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.api.app import create_app
from service.infra.db import close_pool, create_pool
from service.infra.migrate import migrate
from service.infra.settings import Settings
from tests.compatkit import CROWD_BASE, CROWD_SIZE, Crowd, get_json
from tests.eventkit import Broker, delete_namespace
from tests.factories import Org, insert_customer, make_org, set_columns
from tests.offline import install_offline_guard
from tests.processes import Fleet
from tests.statementcapture import install as install_statement_capture
from tests.support import BASE_DSN, with_database

# Every statement tally's code runs is captured for tests/test_citus_routing.py, which runs last.
install_statement_capture()


# The fixtures through which a test reaches PostgreSQL or RabbitMQ. A test whose fixtures
# include neither (and that is not marked `services`) belongs to the fast tier, `make
# test-unit`, which runs with every connection to a service refused (tests/offline.py).
SERVICE_FIXTURES = frozenset({"migrated", "broker"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the fast tier; the Citus routing check judges every statement the session ran, so
    it goes last."""
    for item in items:
        if not SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("services"):
            item.add_marker(pytest.mark.unit)
    items.sort(key=lambda item: item.get_closest_marker("citus_last") is not None)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("TALLY_TEST_OFFLINE"):
        install_offline_guard()


# ---- the database, the API, organizations --------------------------------------------------


@pytest.fixture(scope="session")
def database_name() -> str:
    return f"tally_test_{os.getpid()}_{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def settings(database_name: str) -> Settings:
    return Settings(
        database_url=with_database(BASE_DSN, database_name),
        # Never the default namespace: a tally running on this machine must not see tests.
        amqp_namespace=f"tally_test_{database_name}",
        # The suite hammers the API with few keys; rate limiting and cost shares have their own
        # test apps (tests/test_ratelimit.py, tests/test_fairness.py).
        rate_limit_per_second=1_000_000,
        rate_limit_burst=1_000_000,
        ip_rate_limit_per_second=1_000_000,
        ip_rate_limit_burst=1_000_000,
        org_share_seconds=0,
        # Each test app is a replica of its own; tests/test_replicas.py runs two that share.
        api_heartbeat_seconds=0,
        db_pool_min=1,
        db_pool_max=4,
    )


@pytest.fixture(scope="session")
async def migrated(settings: Settings, database_name: str) -> AsyncIterator[str]:
    await migrate(settings.database_url, settings.migrations_dir)
    yield settings.database_url
    admin = await asyncpg.connect(with_database(BASE_DSN, "postgres"))
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database_name,
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{database_name}"')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def pool(migrated: str, settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(settings.database_url, settings, name="tests")
    yield p
    await close_pool(p)


@pytest.fixture(scope="session")
async def client(migrated: str, settings: Settings) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(settings))) as c:
        yield c
    await delete_namespace(settings.amqp_namespace)


@pytest.fixture
async def org(pool: asyncpg.Pool) -> Org:
    return await make_org(pool)


@pytest.fixture
async def other_org(pool: asyncpg.Pool) -> Org:
    return await make_org(pool)


# ---- the broker and the consumer processes -------------------------------------------------


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    """A private namespace on the real RabbitMQ (its queues, the alerts queue included, and
    exchanges deleted afterwards)."""
    async with Broker() as b:
        yield b


@pytest.fixture
def fleet(migrated: str, settings: Settings, broker: Broker, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(settings, broker, tmp_path)
    try:
        yield f
    finally:
        f.close()  # before the broker fixture deletes the namespace


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


# ---- the compatibility route sets ------------------------------------------------------------


@pytest.fixture(scope="session")
async def openapi_doc(client: TestClient) -> dict[str, Any]:
    return await get_json(client, "/openapi.json", {})


@pytest.fixture(scope="session")
async def crowd(pool: asyncpg.Pool) -> Crowd:
    """A read-only organization of 150 prod customers (and 3 test ones) shared by the
    pagination walks: created_at ties in threes, first_seen ties and missing values, so that
    only a stable tie-break pages without loss or repetition. No test writes to it."""
    org = await make_org(pool)
    rows = []
    async with pool.acquire() as conn, conn.transaction():
        for i in range(CROWD_SIZE):
            row = await insert_customer(
                conn,
                org,
                f"crowd{i:03d}",
                name=f"Crowd {i:03d}",
                email=f"crowd{i:03d}@example.com",
                first_seen=None if i % 10 == 0 else CROWD_BASE + timedelta(hours=i % 40),
            )
            rows.append(await set_columns(conn, row, created_at=CROWD_BASE + timedelta(minutes=i // 3)))
        for i in range(3):
            await insert_customer(conn, org, f"crowdtest{i}", environment="test")
    return org, rows
