"""Limits that hold across API replicas: two real `tally api` processes on one database find
each other by their heartbeats and each enforce their part of a key's request rate, so that
together they admit the key's limit — not twice it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import asyncpg

from service.infra.settings import Settings
from service.store import auth
from tests.eventkit import Broker, wait_until
from tests.factories import Org
from tests.processes import TallyProcess

RATE, BURST = 20, 20  # the key's limit in all: 20 requests at once, then 20 per second
DURATION = 2.0


async def replicas_seen(session: aiohttp.ClientSession, api: TallyProcess) -> float:
    async with session.get(api.url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith("tally_api_replicas "):
            return float(line.split()[1])
    return 0.0


async def hammer(session: aiohttp.ClientSession, urls: list[str], key: str, seconds: float) -> tuple[int, float]:
    """Requests from 8 clients, spread over ``urls`` in turn, for ``seconds``: (200s, seconds)."""
    served = 0
    started = time.perf_counter()

    async def client(n: int) -> None:
        nonlocal served
        i = n
        while time.perf_counter() - started < seconds:
            async with session.get(
                urls[i % len(urls)] + "/v1/customers?limit=1", headers={"Authorization": f"Bearer {key}"}
            ) as r:
                await r.read()
                served += r.status == 200
                assert r.status in (200, 429), r.status
            i += 1

    await asyncio.gather(*(client(n) for n in range(8)))
    return served, time.perf_counter() - started


async def test_a_keys_limit_holds_across_two_replicas(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org, broker: Broker, tmp_path: Path
) -> None:
    async with pool.acquire() as conn:
        key = (await auth.create_key(conn, org.name, ("read",))).key
    env = {
        "TALLY_RATE_LIMIT_PER_SECOND": str(RATE),
        "TALLY_RATE_LIMIT_BURST": str(BURST),
        "TALLY_API_HEARTBEAT_SECONDS": "0.2",
        "TALLY_SHED_DELAY": "0",
        "TALLY_IP_RATE_LIMIT_PER_SECOND": "1000000",
        "TALLY_IP_RATE_LIMIT_BURST": "1000000",
    }
    apis = [TallyProcess(f"api{i}", settings, broker, tmp_path, env, command="api") for i in range(2)]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for api in apis:
                await api.wait_ready(session)

            async def both_see_two() -> bool:
                return [await replicas_seen(session, api) for api in apis] == [2.0, 2.0]

            await wait_until(both_see_two, timeout=15, what="both API processes to count two replicas")
            served, elapsed = await hammer(session, [api.url for api in apis], key, DURATION)
        # The key's limit over the time it was measured: its burst, and its rate after.
        allowed = BURST + RATE * elapsed
        assert abs(served - allowed) <= 0.1 * allowed, (served, round(allowed, 1))
    finally:
        for api in apis:
            await api.terminate()
            api.close()
    # Each left the heartbeat table as it stopped.
    assert await pool.fetchval("SELECT count(*) FROM api_replicas WHERE seen_at > now() - interval '5 s'") == 0
