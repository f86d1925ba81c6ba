"""Reads from a real streaming standby (deploy/local/replica.sh: pg_basebackup of the
machine's PostgreSQL, a second server on port 5433): read-your-writes with the consistency
token, and the standby stopped and started under load.

Marked ``faults`` (a second PostgreSQL server on this machine, started and removed by the
module's fixture): run by ``make test-faults`` and CI. The primary is never stopped here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.api import dbaccess
from service.api.app import create_app
from service.infra.settings import Settings
from service.infra.standby import parse_lsn
from tests.consumerkit import running_consumer
from tests.eventkit import Broker, usage, wait_until
from tests.factories import Org
from tests.support import ok_json, uid, with_database

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "local" / "replica.sh"
PORT = os.environ.get("TALLY_REPLICA_PORT", "5433")
HEADER = "X-Tally-Consistency"


def replica(action: str) -> None:
    done = subprocess.run([str(SCRIPT), action], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"replica.sh {action} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def standby_url(database_name: str, migrated: str) -> Iterator[str]:
    """A streaming standby of the machine's PostgreSQL for this module; removed afterwards,
    whatever happens."""
    try:
        replica("up")
        yield with_database(f"postgresql://127.0.0.1:{PORT}/postgres", database_name)
    finally:
        subprocess.run([str(SCRIPT), "down"], capture_output=True, timeout=300)


@pytest.fixture
async def replicated(settings: Settings, standby_url: str) -> AsyncIterator[TestClient]:
    """The API reading from the standby."""
    s = settings.model_copy(update={"database_read_url": standby_url, "database_read_check_interval": 0.2})
    async with TestClient(TestServer(create_app(s))) as c:
        yield c


async def test_a_read_with_the_token_of_a_write_is_never_stale(
    replicated: TestClient, org: Org, standby_url: str
) -> None:
    app = replicated.server.app
    assert app[dbaccess.STANDBY].up, "the standby should serve reads"
    ident = uid()
    h = org.headers()
    await ok_json(
        await replicated.post("/v1/customers", json={"customer_identifier": ident, "name": "v0"}, headers=h), 201
    )
    rounds, stale_with, stale_without = 300, 0, 0
    for i in range(1, rounds + 1):
        r = await replicated.patch(f"/v1/customers/{ident}", json={"name": f"v{i}"}, headers=h)
        await ok_json(r)
        token = r.headers[HEADER]
        # Without the token first: it may read the standby before it replayed the write, and
        # before it replayed the customer's creation too (a 404: as stale as an older name).
        plain = await replicated.get(f"/v1/customers/{ident}", headers=h)
        assert plain.status in (200, 404), (plain.status, await plain.text())
        stale_without += plain.status == 404 or (await plain.json())["name"] != f"v{i}"
        doc = await ok_json(await replicated.get(f"/v1/customers/{ident}", headers={**h, HEADER: token}))
        stale_with += doc["name"] != f"v{i}"
        # A list with the token sees the write too.
        listed = await ok_json(
            await replicated.get("/v1/customers", params={"customer_identifiers": ident}, headers={**h, HEADER: token})
        )
        stale_with += listed["results"][0]["name"] != f"v{i}"
    # Reads went to the standby (its own sessions, named by the pool), not all to the primary.
    standby = await asyncpg.connect(standby_url)
    try:
        sessions = await standby.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tally-replica'"
        )
    finally:
        await standby.close()
    assert sessions > 0
    print(
        f"\nread-your-writes, {rounds} writes: stale reads with the token {stale_with} (of {2 * rounds}), "
        f"without it {stale_without} (of {rounds})"
    )
    assert stale_with == 0


async def test_a_read_that_saw_data_carries_a_token_no_later_read_goes_behind(replicated: TestClient, org: Org) -> None:
    h = org.headers()
    ident = uid()
    r = await replicated.post("/v1/customers", json={"customer_identifier": ident, "name": "x"}, headers=h)
    written = parse_lsn(r.headers[HEADER])
    r = await replicated.get(f"/v1/customers/{ident}", headers={**h, HEADER: r.headers[HEADER]})
    await ok_json(r)
    assert parse_lsn(r.headers[HEADER]) >= written


async def test_events_posted_then_waited_for_stay_visible_with_the_token(
    settings: Settings, standby_url: str, pool: asyncpg.Pool, broker: Broker, org: Org
) -> None:
    """POST /v1/events, poll until the events show (that read's token covers them), then every
    read with that token sees them — through a second API process reading the same standby too."""
    s = settings.model_copy(update={"database_read_url": standby_url, "amqp_namespace": broker.names.namespace})
    h = org.headers()
    ident = uid()
    async with (
        TestClient(TestServer(create_app(s))) as api,
        TestClient(TestServer(create_app(s))) as other,
        running_consumer(settings, pool, broker),
    ):
        r = await api.post("/v1/events", json=[usage(org.name, ident) for _ in range(3)], headers=h)
        assert r.status == 202, await r.text()
        token: list[str] = []

        async def visible() -> bool:
            r = await api.get(f"/v1/customers/{ident}", headers=h)
            if r.status == 200 and (await r.json())["number_of_requests"] == 3:
                token.append(r.headers[HEADER])
                return True
            return False

        await wait_until(visible, timeout=30, what="the events folded and visible")
        for client in (api, other) * 25:
            r = await client.get(f"/v1/customers/{ident}", headers={**h, HEADER: token[0]})
            assert (await ok_json(r))["number_of_requests"] == 3


async def test_the_standby_stopped_and_started_under_load_loses_no_request(
    replicated: TestClient, org: Org, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tally.standby")
    app = replicated.server.app
    h = org.headers()
    idents = [uid() for _ in range(5)]
    for ident in idents:
        await ok_json(await replicated.post("/v1/customers", json={"customer_identifier": ident}, headers=h), 201)
    statuses: Counter[int] = Counter()
    stale = [0]
    stop = asyncio.Event()

    async def reader(n: int) -> None:
        token: str | None = None
        while not stop.is_set():
            ident = idents[n % len(idents)]
            if n % 3 == 0:  # a writer that reads its own write back
                r = await replicated.patch(f"/v1/customers/{ident}", json={"name": f"w{n}"}, headers=h)
                statuses[r.status] += 1
                if r.status != 200:
                    continue
                token = r.headers[HEADER]
                r = await replicated.get(f"/v1/customers/{ident}", headers={**h, HEADER: token})
                statuses[r.status] += 1
                if r.status == 200:
                    stale[0] += (await r.json())["name"] != f"w{n}"
                n += 3
            else:
                path = "/v1/customers" if n % 3 == 1 else f"/v1/customers/{ident}/usage"
                r = await replicated.get(path, headers=h)
                statuses[r.status] += 1
                await r.read()

    async def readyz() -> dict:
        r = await replicated.get("/readyz")
        assert r.status == 200, await r.text()  # the standby down degrades; it never fails readiness
        return await r.json()

    readers = [asyncio.create_task(reader(n)) for n in range(6)]
    try:
        await wait_until(lambda: _served(statuses, 200), what="load running")
        for _ in range(2):
            await asyncio.to_thread(replica, "stop")
            await wait_until(lambda: _status_is(readyz, "degraded"), timeout=30, what="/readyz degraded")
            assert not app[dbaccess.STANDBY].up
            before = statuses[200]
            await wait_until(lambda n=before + 50: _served(statuses, n), what="reads served by the primary meanwhile")
            await asyncio.to_thread(replica, "start")
            await wait_until(lambda: _status_is(readyz, "ok"), timeout=60, what="/readyz ok again")
            assert app[dbaccess.STANDBY].up
    finally:
        stop.set()
        results = await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.to_thread(replica, "start")
    assert not [r for r in results if isinstance(r, BaseException)], results
    print(
        f"\nstandby stopped and started twice under load: statuses {dict(statuses)}, stale reads with token {stale[0]}"
    )
    assert set(statuses) <= {200, 503}, statuses
    assert stale[0] == 0
    downs = [r for r in caplog.records if r.name == "tally.standby" and "standby down" in r.getMessage()]
    ups = [r for r in caplog.records if r.name == "tally.standby" and "standby up" in r.getMessage()]
    assert len(downs) >= 2 and len(ups) >= 2, [r.getMessage() for r in caplog.records]


async def _served(statuses: Counter[int], n: int) -> bool:
    await asyncio.sleep(0)
    return statuses[200] >= n


async def _status_is(readyz, want: str) -> bool:  # type: ignore[no-untyped-def]
    return (await readyz())["status"] == want
