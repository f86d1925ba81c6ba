"""Small helpers shared by the tests: where the test databases live, and what the API
tests ask of responses (no fixtures here: those live in conftest.py)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from yarl import URL

from service.infra.migrate import migrate

BASE_DSN = os.environ.get(
    "TALLY_TEST_DATABASE_URL", os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally")
)
PROBLEM = "application/problem+json"


def with_database(dsn: str, name: str) -> str:
    """``dsn`` with its database replaced by ``name``."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


@asynccontextmanager
async def lagging_standby(migrations_dir: Path) -> AsyncIterator[str]:
    """The URL of a read standby that has replayed the schema and none of the rows since: a
    database of its own, migrated and never written to (a read it serves misses what the
    primary has, as a read from a standby that lags does). Dropped afterwards."""
    name = f"tally_test_standby_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(with_database(BASE_DSN, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            await migrate(with_database(BASE_DSN, name), migrations_dir)
            yield with_database(BASE_DSN, name)
        finally:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def with_user(dsn: str, user: str) -> str:
    """``dsn`` connecting as ``user`` (no password: the test server trusts local roles)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def uid(prefix: str = "c") -> str:
    """A customer identifier no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def rel(link: str) -> str:
    """An absolute link from a response, as the path and query the test client requests."""
    url = URL(link, encoded=True)
    assert url.is_absolute(), link
    return url.raw_path_qs


async def problem(resp: ClientResponse, status: int, *names: str) -> dict[str, Any]:
    """Assert ``resp`` is an RFC 9457 problem with ``status`` whose errors name each of ``names``."""
    text = await resp.text()
    assert resp.status == status, (resp.status, text)
    assert resp.content_type == PROBLEM, (resp.content_type, text)
    body = await resp.json(content_type=None)
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["instance"] == resp.url.path
    assert body["request_id"]
    named = [e["name"] for e in body["errors"]]
    for name in names:
        assert name in named, (name, body)
    for error in body["errors"]:
        assert set(error) == {"name", "in", "detail"}
    return body


async def ok_json(resp: ClientResponse, status: int = 200) -> Any:
    text = await resp.text()
    assert resp.status == status, (resp.status, text)
    assert resp.content_type == "application/json", resp.content_type
    return await resp.json()


async def list_page(client: TestClient, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    resp = await client.get("/v1/customers", params={k: str(v) for k, v in params.items()}, headers=headers)
    return await ok_json(resp)


async def follow(client: TestClient, first: dict[str, Any], headers: dict[str, str], link: str = "next") -> list[dict]:
    """``first`` and every page reached by following its ``link`` (next or previous) to the end."""
    pages = [first]
    seen: set[str] = set()
    while pages[-1][link] is not None:
        url = pages[-1][link]
        assert url not in seen, f"{link} loops back to {url}"
        seen.add(url)
        assert len(pages) < 500, "runaway pagination"
        pages.append(await ok_json(await client.get(rel(url), headers=headers)))
    return pages


def ids(pages: list[dict[str, Any]] | dict[str, Any]) -> list[str]:
    if isinstance(pages, dict):
        pages = [pages]
    return [c["id"] for page in pages for c in page["results"]]


def identifiers(page: dict[str, Any]) -> list[str]:
    return [c["customer_identifier"] for c in page["results"]]


# rabbitmqctl administers the local RabbitMQ (users, policies, connections) where the test
# runs as root or as the rabbitmq user beside the broker; elsewhere the tests that need it skip.
RABBITMQCTL = shutil.which("rabbitmqctl")


@functools.cache
def rabbitmqctl_problem() -> str | None:
    """Why rabbitmqctl cannot administer the local broker (absent, or refused: it needs the
    broker's Erlang cookie, which only root and the rabbitmq user can read), or None."""
    if RABBITMQCTL is None:
        return "rabbitmqctl is not installed (the rabbitmq-server package)"
    done = subprocess.run([RABBITMQCTL, "-q", "status"], cwd="/", capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return f"rabbitmqctl cannot reach the broker: {(done.stderr or done.stdout).strip()[:200]}"
    return None


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl from / (a folder its Erlang can read: see deploy/local/rabbit-cluster.sh)."""
    assert RABBITMQCTL is not None
    done = subprocess.run([RABBITMQCTL, "-q", *args], cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"rabbitmqctl {args[0]} failed: {done.stdout}{done.stderr}"
    return done.stdout


async def told(client: TestClient, pool: asyncpg.Pool, organization_id: uuid.UUID, environment: str = "prod") -> None:
    """Tell ``client``'s API what a test wrote behind tally's back (a factory's SQL), as every
    write through tally does (service/store/changelog.py), and wait until it has heard: its
    read cache holds nothing of the organization's from before."""
    from service.api import appkeys
    from service.store.changelog import CHANNEL, notice
    from tests.eventkit import wait_until

    watch = client.server.app[appkeys.CHANGE_WATCH]
    scope = (organization_id, environment)
    before = watch.version(scope)
    await pool.execute("SELECT pg_notify($1, $2)", CHANNEL, notice(organization_id, environment))

    async def heard() -> bool:
        return watch.version(scope) != before

    await wait_until(heard, what="the API to hear of the change")


# The repository's root: the tally CLI runs from here.
CLI_ROOT = Path(__file__).resolve().parent.parent


def tally(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=CLI_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "TALLY_LOG_FORMAT": "text", **(env or {})},
    )
