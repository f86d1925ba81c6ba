"""``tally demo`` as a newcomer runs it: it publishes a stream a consumer folds into customers,
prints a key that reads them and one that writes, and gives a customer a budget whose alert
fires."""

from __future__ import annotations

import asyncio
import os
import sys
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
from aiohttp.test_utils import TestClient

from service.infra.settings import Settings
from service.store.alerts import ALERT_TYPE
from tests.consumerkit import running_consumer
from tests.eventkit import Broker, wait_until
from tests.processes import ROOT

CUSTOMERS, EVENTS, ORGS = 30, 600, 2


async def demo(settings: Settings, broker: Broker) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        "demo",
        f"--customers={CUSTOMERS}",
        f"--events={EVENTS}",
        f"--orgs={ORGS}",
        "--batch=50",
        cwd=ROOT,
        env={
            **os.environ,
            "TALLY_DATABASE_URL": settings.database_url,
            "TALLY_AMQP_NAMESPACE": broker.names.namespace,
            "TALLY_LOG_FORMAT": "text",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_demo_prints_both_keys_and_fires_a_budget_alert(
    client: TestClient, settings: Settings, pool: asyncpg.Pool, broker: Broker
) -> None:
    async with running_consumer(settings, pool, broker):
        code, out, err = await demo(settings, broker)
        assert code == 0, err
        *_, write_line, read_key = out.strip().splitlines()
        assert write_line.startswith("write key: ")
        write_key = write_line.removeprefix("write key: ")
        assert "budget alert fires for demo-acme's user_00000" in err, err
        read, write = {"Authorization": f"Bearer {read_key}"}, {"Authorization": f"Bearer {write_key}"}

        async def folded() -> bool:
            r = await client.get("/v1/customers", params={"limit": "1"}, headers=read)
            return r.status == 200 and (await r.json())["count"] == CUSTOMERS // ORGS

        await wait_until(folded, timeout=60, what="the demo's customers folded")

        async def alert_published() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM budget_alerts a JOIN customers c"
                    " ON c.organization_id = a.organization_id AND c.id = a.customer_id"
                    " JOIN organizations o ON o.id = a.organization_id"
                    " WHERE o.name = 'demo-acme' AND c.customer_identifier = 'user_00000'"
                    " AND a.threshold = 'total_100' AND a.published_at IS NOT NULL"
                )
            )

        await wait_until(alert_published, timeout=60, what="the demo's budget alert recorded and published")

    busiest = await (await client.get("/v1/customers/user_00000", headers=read)).json()
    # Its budget is half of what the whole stream made it spend (to the cent).
    assert abs(Decimal(busiest["total_cost"]) / 2 - Decimal(busiest["total_budget"])) <= Decimal("0.005"), busiest
    queue = await broker.channel.declare_queue(broker.names.alerts, passive=True)  # type: ignore[union-attr]
    alerts: list[dict[str, Any]] = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        alerts.append(orjson.loads(message.body))
    assert any(a["type"] == ALERT_TYPE and a["subject"] == "user_00000" for a in alerts), alerts
    # The read key only reads; the write key writes.
    patch = {"metadata": {"plan_tier": "enterprise"}}
    assert (await client.patch("/v1/customers/user_00000", json=patch, headers=read)).status == 403
    assert (await client.patch("/v1/customers/user_00000", json=patch, headers=write)).status == 200
