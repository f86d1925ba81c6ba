"""Fixtures against the real PostgreSQL (and RabbitMQ): a fresh database per test session,
migrated by the real migrator; unique organizations per test so tests need no cleanup."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.infra.broker import Names
from service.core import auth
from service.api.app import create_app
from service.infra.db import close_pool, create_pool
from service.infra.migrate import migrate
from service.infra.settings import Settings

BASE_DSN = os.environ.get("TALLY_TEST_DATABASE_URL", os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))


def _with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


@pytest.fixture(scope="session")
def database_name() -> str:
    return f"tally_test_{os.getpid()}_{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def settings(database_name: str) -> Settings:
    return Settings(
        database_url=_with_database(BASE_DSN, database_name),
        # Never the default namespace: a tally running on this machine must not see tests.
        amqp_namespace=f"tally_test_{database_name}",
        # The suite hammers the API with few keys; rate limiting has its own test app.
        rate_limit_per_second=1_000_000,
        rate_limit_burst=1_000_000,
        ip_rate_limit_per_second=1_000_000,
        ip_rate_limit_burst=1_000_000,
        db_pool_min=1,
        db_pool_max=4,
    )


@pytest.fixture(scope="session")
async def migrated(settings: Settings, database_name: str) -> AsyncIterator[str]:
    await migrate(settings.database_url, settings.migrations_dir)
    yield settings.database_url
    admin = await asyncpg.connect(_with_database(BASE_DSN, "postgres"))
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


async def delete_namespace(namespace: str) -> None:
    """Remove a test namespace's queues and exchanges from the broker (if declared)."""
    names = Names(namespace)
    connection = await aio_pika.connect(settings_amqp_url())
    try:
        for queue in (names.ingest, names.dead, names.alerts):
            channel = await connection.channel()
            await channel.queue_delete(queue)
        for exchange in (names.events, names.dlx):
            channel = await connection.channel()
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


def settings_amqp_url() -> str:
    return os.environ.get("TALLY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass
class Org:
    id: uuid.UUID
    name: str
    key: str  # read, write (prod)
    read_key: str
    test_key: str  # read, write (test environment)

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


async def make_org(pool: asyncpg.Pool) -> Org:
    name = f"org-{uuid.uuid4().hex[:10]}"
    async with pool.acquire() as conn:
        org_id = await auth.create_organization(conn, name)
        key = await auth.create_key(conn, name, ("read", "write"))
        read = await auth.create_key(conn, name, ("read",))
        test = await auth.create_key(conn, name, ("read", "write"), environment="test")
    return Org(org_id, name, key.key, read.key, test.key)


@pytest.fixture
async def org(pool: asyncpg.Pool) -> Org:
    return await make_org(pool)


@pytest.fixture
async def other_org(pool: asyncpg.Pool) -> Org:
    return await make_org(pool)


INSERT_CUSTOMER_COLUMNS = (
    "organization_id", "environment", "customer_identifier", "name", "email", "status", "metadata",
    "parent_customer_id", "first_seen", "last_active", "active_days", "number_of_requests", "prompt_tokens",
    "completion_tokens", "total_tokens", "total_cost", "latency_sum", "latency_count", "ttft_sum", "ttft_count",
    "total_budget", "period_budget", "budget_duration",
)  # fmt: skip


async def insert_customer(pool: asyncpg.Pool, org: Org, identifier: str | None = None, **fields: object) -> dict:
    """Insert one customer row directly (a factory for read tests); returns the row."""
    row = {
        "organization_id": org.id,
        "environment": "prod",
        "customer_identifier": identifier or f"cust_{uuid.uuid4().hex[:8]}",
        "status": "active",
        "metadata": {},
        **fields,
    }
    columns = [c for c in INSERT_CUSTOMER_COLUMNS if c in row]
    unknown = set(row) - set(INSERT_CUSTOMER_COLUMNS)
    assert not unknown, unknown
    sql = (
        f"INSERT INTO customers ({', '.join(columns)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(columns)))})"
        " RETURNING *"
    )
    return dict(await pool.fetchrow(sql, *(row[c] for c in columns)))
