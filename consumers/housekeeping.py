"""The consumer process's periodic jobs, each its own task beside the ingest loop (never on
its timers, so no job delays a batch):

- **compact counts**: fold the customer-count delta rows (service/store/customers.py);
- **purge**: forget dedupe keys, journal rows and tombstones older than the retention window,
  and change-log rows older than theirs;
- **analyze**: refresh the statistics of tables a fold changed past autovacuum's threshold, for
  servers whose autovacuum is off or behind (plans never depend on them for their shape), and
  where autovacuum is off, vacuum tables whose deleted rows it would have reclaimed;
- **relay alerts**: publish budget alerts recorded by folds (this process's, at once, or a
  crashed one's, within ALERT_RELAY_EVERY);
- **roll usage windows**: after an organization's local midnight, move its customers' maintained
  window sums to the new day (service/store/windows.py), so that lists ranked inside the last
  7 or 30 days or this month read them again;
- **record recoveries**: after a budget period ends, record which of its period-threshold
  alerts recovered (service/store/alerts.py ``recover``): webhook ``alert.budget.recovered``;
- **poll queues**: export the ingest and dead-letter queues' depth and consumers as gauges.

A job that fails is logged and tried again at its next turn: housekeeping never stops
ingestion and never ends the process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import aio_pika
import asyncpg
import orjson

from service.domain.events import EVENT_CONTENT_TYPE
from service.infra import metrics
from service.infra.broker import Names
from service.infra.errors import is_transient
from service.infra.publisher import Publisher
from service.infra.settings import Settings
from service.infra.waits import wait_event
from service.store import windows
from service.store.alerts import ALERT_ROUTING_KEY, recover, relay_alerts
from service.store.housekeeping import analyze_stale, compact_counts, purge_changes, purge_processed, vacuum_dead

log = logging.getLogger("tally.housekeeping")

# The count deltas grow by about one row per batch that creates customers; compacting this
# often keeps a count read to a few hundred rows at most.
COMPACT_EVERY = 10.0
PURGE_EVERY = 600.0
# Alerts recorded by a consumer that crashed before relaying them are picked up this often.
ALERT_RELAY_EVERY = 5.0
ALERT_RELAY_CHUNK = 100
QUEUE_POLL_EVERY = 15.0
# Recoveries are looked for this often, for periods that ended RECOVERY_SETTLE ago or more: a
# fold that read its clock just before a period ended may commit that period's alert a little
# after (each of a batch's few statements is bounded by TALLY_DB_COMMAND_TIMEOUT, 10 s by default).
RECOVER_EVERY = 30.0
RECOVERY_SETTLE = timedelta(minutes=2)
# Organizations whose day changed RECOVERY_SETTLE ago or more (for the same reason) have their
# window sums rolled; looked for this often.
ROLL_EVERY = 30.0
# Statistics are checked this often, and tables a fold changed past autovacuum's own threshold
# analyzed (service/store/housekeeping.py analyze_stale).
ANALYZE_EVERY = 30.0


@dataclass
class Job:
    name: str
    every: float
    run: Callable[[], Awaitable[None]]
    # Set to run the job at once rather than at its next turn (cleared when it runs).
    nudge: asyncio.Event | None = None


class Housekeeping:
    """The jobs of one consumer process, started with :meth:`start` and stopped with
    :meth:`stop` (a job in progress is cancelled: each is safe to cut short)."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        *,
        alerts_recorded: asyncio.Event,
        started_consuming: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.names = Names(settings.amqp_namespace)
        self.retention = timedelta(days=settings.dedupe_retention_days)
        self.change_log_retention = timedelta(hours=settings.change_log_retention_hours)
        # Its own broker connection (publisher confirms), apart from the ingest channel.
        self.publisher = Publisher(settings.amqp_url, self.names)
        self.jobs = [
            Job("compact counts", COMPACT_EVERY, self.compact_counts),
            Job("purge", PURGE_EVERY, self.purge),
            Job("analyze", ANALYZE_EVERY, self.analyze),
            Job("relay alerts", ALERT_RELAY_EVERY, self.relay_alerts, alerts_recorded),
            Job("record recoveries", RECOVER_EVERY, self.record_recoveries),
            Job("roll usage windows", ROLL_EVERY, self.roll_windows),
            Job("poll queues", QUEUE_POLL_EVERY, self.poll_queues, started_consuming),
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(job), name=f"tally-{job.name}") for job in self.jobs]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.publisher.close()

    async def _loop(self, job: Job) -> None:
        while True:
            try:
                await job.run()
            except Exception as exc:
                if is_transient(exc):  # database or broker trouble: waited out, tried next turn
                    log.warning("%s deferred", job.name, extra={"error": repr(exc)})
                else:  # a job's bug must not end ingestion: report it loudly, carry on
                    log.exception("%s failed", job.name)
            if job.nudge is None:
                await asyncio.sleep(job.every)
                continue
            await wait_event(job.nudge, job.every)
            job.nudge.clear()

    async def compact_counts(self) -> None:
        async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
            await compact_counts(conn)

    async def purge(self) -> None:
        async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
            purged = await purge_processed(conn, self.retention)
            changes = await purge_changes(conn, self.change_log_retention)
        if purged:
            log.info("purged expired dedupe keys", extra={"count": purged})
        if changes:
            log.info("purged expired change-log rows", extra={"count": changes})

    async def analyze(self) -> None:
        async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
            vacuumed = await vacuum_dead(conn)
            analyzed = await analyze_stale(conn)
        if vacuumed:
            log.info(
                "vacuumed tables whose dead rows autovacuum (off) would have reclaimed", extra={"tables": vacuumed}
            )
        if analyzed:
            log.info("analyzed tables whose statistics were stale", extra={"tables": analyzed})

    async def relay_alerts(self) -> None:
        """Publish recorded budget alerts until none is left (chunks of ALERT_RELAY_CHUNK)."""

        async def publish(event: dict[str, object]) -> None:
            message = aio_pika.Message(
                orjson.dumps(event),
                content_type=EVENT_CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(event["id"]),
            )
            await self.publisher.publish(message, ALERT_ROUTING_KEY)

        while await relay_alerts(self.pool, publish, limit=ALERT_RELAY_CHUNK) == ALERT_RELAY_CHUNK:
            pass

    async def record_recoveries(self) -> None:
        async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
            recorded = await recover(conn, RECOVERY_SETTLE)
        if recorded:
            log.info("recorded budget recoveries", extra={"count": recorded})

    async def roll_windows(self) -> None:
        async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
            for organization_id, day in await windows.due(conn, RECOVERY_SETTLE):
                started = time.monotonic()
                rolled = await windows.roll(conn, organization_id, day)
                if rolled is None:  # another consumer is rolling it
                    continue
                log.info(
                    "rolled usage windows",
                    extra={
                        "organization_id": str(organization_id),
                        "day": day.isoformat(),
                        "customers": rolled.customers,
                        "changed": rolled.changed,
                        "seconds": round(time.monotonic() - started, 3),
                    },
                )

    async def poll_queues(self) -> None:
        """Queue depths and consumers as metrics (every consumer exports them; they agree)."""
        topology = await self.publisher.topology()
        for queue in (topology.ingest, topology.dead):
            declared = await queue.declare()
            metrics.QUEUE_MESSAGES.labels(queue.name).set(declared.message_count or 0)
            metrics.QUEUE_CONSUMERS.labels(queue.name).set(declared.consumer_count or 0)
