"""The consumer in-process, for tests: the ingest loop and its housekeeping jobs on the test's
pool and private broker namespace, optionally on an injected clock; and waits on what it has
consumed (no fixtures here: those live in conftest.py)."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from datetime import datetime
from unittest import mock

import asyncpg

import consumers.ingest
from consumers.housekeeping import Housekeeping
from consumers.ingest import Consumer
from service.infra.settings import Settings
from tests.eventkit import Broker, usage, wait_until
from tests.factories import Org


@asynccontextmanager
async def running_consumer(
    settings: Settings, pool: asyncpg.Pool, broker: Broker, *, clock: datetime | None = None, **overrides: object
) -> AsyncIterator[Consumer]:
    """A consumer on ``broker``'s namespace until the block ends. With ``clock``, every fold
    runs at that instant (the fold's ``now``: its retention cutoff and the budget periods its
    alerts are recorded in) however long the test takes."""
    s = settings.model_copy(update={"amqp_namespace": broker.names.namespace, "batch_max_wait": 0.02, **overrides})
    with ExitStack() as stack:
        if clock is not None:
            stack.enter_context(
                mock.patch.object(consumers.ingest, "fold", functools.partial(consumers.ingest.fold, now=clock))
            )
        consumer = Consumer(s, pool)
        task = asyncio.create_task(consumer.run())
        # As in the process (consumers/app.py): the periodic jobs run beside the ingest loop.
        housekeeping = Housekeeping(
            s, pool, alerts_recorded=consumer.alerts_recorded, started_consuming=consumer.started_consuming
        )
        housekeeping.start()

        async def connected() -> bool:
            if task.done():
                task.result()
            return consumer.connected.is_set()

        await wait_until(connected, what="consumer connected")
        try:
            yield consumer
        finally:
            await consumer.stop()
            await asyncio.wait_for(task, 30)
            await housekeeping.stop()


async def drained(broker: Broker) -> bool:
    return await broker.queue_depth(broker.names.ingest) == 0


async def barrier(pool: asyncpg.Pool, broker: Broker, org: Org) -> None:
    """Publish a marker event and wait until it is applied: one in-process consumer folds
    messages in order, so everything published before it has been applied too."""
    marker = f"barrier_{uuid.uuid4().hex[:8]}"
    await broker.publish(usage(org.name, marker))

    async def applied() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT count(*) FROM customers WHERE organization_id = $1 AND customer_identifier = $2", org.id, marker
            )
        )

    await wait_until(applied, what="barrier event applied")
