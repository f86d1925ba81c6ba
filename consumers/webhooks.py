"""The webhook dispatcher: a job of the consumer process (``tally consume``, and ``tally dev``),
beside the ingest loop and the housekeeping jobs, so that webhooks need no process of their own.

Each turn it materialises the events committed since each endpoint's cursors into delivery
rows (after this process's fold commits, or TALLY_WEBHOOK_POLL_SECONDS since it last looked:
commits of other processes; an endpoint with MATERIALIZE_AHEAD deliveries pending waits for its
receiver), then leases due deliveries and sends them (service/store/webhooks.py says how both
stay exactly-once and never overlap across dispatchers). It wakes when this process's fold
commits, when an attempt ends (room to send another), and every TALLY_WEBHOOK_POLL_SECONDS
(due retries).

Sending. One aiohttp ClientSession: no redirects (a 3xx is a failure), a total timeout, at
most RESPONSE_BYTES of the answer read, no proxy from the environment. Unless
TALLY_WEBHOOK_ALLOW_PRIVATE is on, the resolver drops every address that is not public (and
fails when none is left), and aiohttp connects only to the addresses its resolver returned:
the address checked is the address connected to, whatever a name resolves to the next time
(DNS rebinding). An IP literal in the URL is checked before the request, as aiohttp does not
resolve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from service import __version__
from service.domain.webhooks import SIGNATURE_HEADER, address_refusal, check_url, retry_delay, signature_header
from service.infra import metrics
from service.infra.errors import is_transient
from service.infra.settings import Settings
from service.infra.waits import wait_any
from service.store import webhooks as store
from service.store.changefeed import Cursor, FeedPage
from service.store.rendering import Shape

log = logging.getLogger("tally.webhooks")

# The most of a receiver's answer read: its status is what counts, the body is never used.
RESPONSE_BYTES = 4096
# Changes (and alerts) one endpoint's materialisation takes at once: a fold's largest batch
# (TALLY_BATCH_MAX_EVENTS' default) touches at most this many customers.
MATERIALIZE_CHUNK = 4000
# An endpoint with this many deliveries pending gets no more made while its backlog is younger
# than MATERIALIZE_AHEAD_AGE (service/store/webhooks.py ENDPOINTS_WITH_WORK): deliveries are
# made about as fast as its receiver takes them, and a fold's burst is not written out ten
# times over (once per endpoint) while it runs.
MATERIALIZE_AHEAD = MATERIALIZE_CHUNK
MATERIALIZE_AHEAD_AGE = timedelta(minutes=5)
# A lease outlasts the attempt's total timeout by this much, so an attempt still running when
# its lease ends is impossible short of a stalled process; it is also how long a delivery
# leased by a process that died waits, beyond that timeout, before another takes it.
LEASE_MARGIN = 5.0
# Commits closer together than this share one round of materialisation: a consumer folding
# single-event messages commits many small batches a second, and a round after each (a few
# statements per endpoint) competed with the fold for the same cores.
MATERIALIZE_GAP = 0.5
# While the fold beside it has a backlog, the dispatcher yields (TALLY_WEBHOOK_YIELD_RATE): it
# makes deliveries in one pass this far apart at most (a customer's updates in between become
# one), and, while its ration is what holds it back, looks this often whether it may send more.
YIELD_MATERIALIZE_GAP = 5.0
YIELD_TICK = 0.1
BACKLOG_EVERY = 5.0
PURGE_EVERY = 600.0


class AddressRefused(OSError):
    """The endpoint's address is not one a webhook may reach."""


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, returning only the public addresses a name resolves to."""

    def __init__(self) -> None:
        self.inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        resolved = await self.inner.resolve(host, port, family)
        kept = [r for r in resolved if address_refusal(r["host"]) is None]
        if not kept:
            reasons = "; ".join(sorted({str(address_refusal(r["host"])) for r in resolved}))
            raise AddressRefused(f"{host} resolves to no public address ({reasons})")
        return kept

    async def close(self) -> None:
        await self.inner.close()


class Dispatcher:
    """The dispatcher of one process. ``clock`` (Unix seconds) and ``jitter`` (a number in
    [0, 1)) are injectable: tests move time instead of waiting for it."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        shape: Shape,
        *,
        wake: asyncio.Event | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        ahead: int = MATERIALIZE_AHEAD,
        behind: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.ahead = ahead
        # Whether the fold of this process has a backlog (consumers/ingest.py Consumer.backlogged).
        self.behind = behind
        # While yielding: the deliveries it may still send, refilled at the yield rate (a
        # second's worth at most), and when it was last refilled.
        self._ration = float(settings.webhook_yield_rate)
        self._rationed_at = clock()
        self._short = False  # the last claim was cut short by the ration (not by the room or by what was due)
        self.pool = pool
        self.shape = shape
        self.wake = wake or asyncio.Event()  # set by commits: events to make into deliveries
        self.room = asyncio.Event()  # set when an attempt ends: room to send another
        self.clock = clock
        self.jitter = jitter
        self._session: aiohttp.ClientSession | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            private = self.settings.webhook_allow_private
            connector = aiohttp.TCPConnector(resolver=None if private else PublicResolver(), limit=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_seconds),
                headers={"User-Agent": f"tally-webhooks/{__version__}"},
                trust_env=False,
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        for task in self._sending:
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # ---- the turns ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Turn until cancelled: a turn that fails is logged and tried again."""
        last_backlog = last_purge = last_made = -float("inf")
        while True:
            busy = False
            yielding = self.behind()
            metrics.WEBHOOK_YIELDING.set(1 if yielding else 0)
            gap = YIELD_MATERIALIZE_GAP if yielding else MATERIALIZE_GAP
            try:
                # Deliveries are made after commits (at most one round per MATERIALIZE_GAP) or
                # a poll's worth of time (commits of other processes), not after every attempt
                # that ends: a turn per attempt looked for new events hundreds of times a
                # second while a backlog was sent. A round makes all there is to make but for
                # endpoints whose receivers are behind (MATERIALIZE_AHEAD).
                since = time.monotonic() - last_made
                if (self.wake.is_set() and since >= gap) or since >= max(gap, self.settings.webhook_poll_seconds):
                    self.wake.clear()
                    last_made = time.monotonic()
                    busy = await self.materialize(yielding=yielding) > 0
                self.room.clear()
                busy = await self.send_due(wait=False) > 0 or busy
                if time.monotonic() - last_backlog >= BACKLOG_EVERY:
                    last_backlog = time.monotonic()
                    await self.watch_backlog()
                if time.monotonic() - last_purge >= PURGE_EVERY:
                    last_purge = time.monotonic()
                    await self.purge()
            except Exception as exc:
                if is_transient(exc):
                    log.warning("webhooks deferred", extra={"error": repr(exc)})
                else:
                    log.exception("webhooks failed")
            if not busy:
                # Held back by its ration, it looks every YIELD_TICK whether it may send more.
                tick = YIELD_TICK if yielding and self._short else float("inf")
                if self.wake.is_set():  # a commit heard too soon after the last round
                    await wait_any([self.room], min(tick, max(0.0, gap - (time.monotonic() - last_made))))
                else:
                    await wait_any([self.wake, self.room], min(tick, self.settings.webhook_poll_seconds))

    async def step(self) -> int:
        """One whole turn, attempts awaited: what tests drive. How many deliveries it made and sent."""
        made = await self.materialize(yielding=self.behind())
        return made + await self.send_due(wait=True)

    async def materialize(self, *, yielding: bool = False) -> int:
        """Turn every endpoint's new events into deliveries; how many were made. Endpoints go
        a chunk each per round, in step, so that those of one environment share the round's
        read of the feed (store.materialize ``pages``); a round keeps only its own pages.
        ``yielding``: one pass, in which an endpoint gets at most what the ration sends until
        the next pass made, and nothing while it has that many pending (unless its backlog is
        old: then that many per pass, so a long backlog costs the fold no more than a short one)."""
        settings = self.settings
        paced = int(settings.webhook_yield_rate * YIELD_MATERIALIZE_GAP)
        ahead = min(self.ahead, paced) if yielding else self.ahead
        chunk = min(MATERIALIZE_CHUNK, ahead) if yielding else MATERIALIZE_CHUNK
        made = 0
        async with self.pool.acquire(timeout=settings.db_connect_timeout) as conn:

            async def with_room() -> list[tuple[UUID, UUID]]:
                return await store.endpoints_with_work(conn, ahead, self.now() - MATERIALIZE_AHEAD_AGE)

            pending = await with_room()
            while pending:
                pages: dict[tuple[UUID, str], tuple[Cursor, FeedPage]] = {}
                rendered: store.Rendered = {}
                more = []
                for organization_id, endpoint_id in pending:
                    now = self.now()
                    done = await store.materialize(
                        conn,
                        organization_id,
                        endpoint_id,
                        self.shape,
                        now,
                        now + timedelta(hours=settings.webhook_retry_hours),
                        limit=chunk,
                        pages=pages,
                        rendered=rendered,
                    )
                    made += done.deliveries
                    if done.too_old:
                        log.warning(
                            "webhook endpoint missed changes older than the change log keeps",
                            extra={"endpoint": str(endpoint_id), "organization": str(organization_id)},
                        )
                    if done.more:
                        more.append((organization_id, endpoint_id))
                if yielding:  # one pass while the fold is behind
                    break
                if more:  # those that filled their room this round wait for their receiver
                    room = set(await with_room())
                    more = [e for e in more if e in room]
                pending = more
        return made

    async def send_due(self, *, wait: bool) -> int:
        """Lease the due deliveries this process has room for and attempt each; with ``wait``,
        return once every attempt ended. How many were leased."""
        concurrency = self.settings.webhook_concurrency
        room = concurrency - len(self._sending)
        # Refilled by halves: a claim is a statement of its own, and one per ended attempt
        # would cost more than the attempts.
        if room <= 0 or (self._sending and room < max(1, concurrency // 2)):
            return 0
        yielding = self.behind()
        rationed = self._rationed(yielding)
        self._short = yielding and rationed < room
        room = min(room, rationed)
        if room <= 0:
            return 0
        now = self.now()
        lease = now + timedelta(seconds=self.settings.webhook_timeout_seconds + LEASE_MARGIN)
        async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
            claimed = await store.claim(conn, now, lease, room)
        if yielding:
            self._ration -= len(claimed)
            self._short = self._short and len(claimed) == room  # else nothing more was due
        tasks = [asyncio.create_task(self.attempt(c), name="tally-webhook") for c in claimed]
        for task in tasks:
            self._sending.add(task)
            task.add_done_callback(self._ended)
        if wait:
            await asyncio.gather(*tasks)
        return len(claimed)

    def _rationed(self, yielding: bool) -> int:
        """How many deliveries it may send now: while ``yielding``, what its ration holds
        (TALLY_WEBHOOK_YIELD_RATE a second, a second's worth saved at most); else no bound,
        and the ration is full for the next backlog."""
        rate = self.settings.webhook_yield_rate
        now = self.clock()
        self._ration = min(rate, self._ration + max(0.0, now - self._rationed_at) * rate) if yielding else rate
        self._rationed_at = now
        return int(self._ration) if yielding else self.settings.webhook_concurrency

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self.room.set()  # room for another, and a customer's next delivery may be due
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt failed unexpectedly", exc_info=task.exception())

    # ---- one attempt -------------------------------------------------------------------------

    async def attempt(self, claimed: store.Claimed) -> None:
        """Send one delivery and record the outcome (retried on transient database trouble;
        if recording still fails, the lease ends and the delivery is attempted again)."""
        status, error = await self.send(claimed)
        now = self.now()
        for tries in range(3):
            try:
                async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
                    if error is None and status is not None:
                        await store.record_success(conn, claimed, now, status)
                        metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                        return
                    delay = retry_delay(
                        claimed.attempt,
                        self.settings.webhook_retry_base_seconds,
                        self.settings.webhook_retry_max_seconds,
                        self.jitter(),
                    )
                    failure = await store.record_failure(
                        conn,
                        claimed,
                        now,
                        now + timedelta(seconds=delay),
                        status,
                        error or "",
                        now - timedelta(hours=self.settings.webhook_disable_after_hours),
                    )
                break
            except Exception as exc:
                if not is_transient(exc) or tries == 2:
                    raise
                await asyncio.sleep(1.0)
        outcome = "failed" if failure.gave_up else "refused" if error and error.startswith("refused") else "retry"
        metrics.WEBHOOK_DELIVERIES.labels(outcome).inc()
        if failure.gave_up:
            log.warning(
                "webhook delivery failed for good",
                extra={"endpoint": str(claimed.endpoint_id), "delivery": claimed.delivery_id, "error": error},
            )
        if failure.disabled:
            metrics.WEBHOOK_DISABLED.inc()
            log.warning(
                "webhook endpoint disabled: every attempt failed for TALLY_WEBHOOK_DISABLE_AFTER_HOURS",
                extra={
                    "endpoint": str(claimed.endpoint_id),
                    "organization": str(claimed.organization_id),
                    "url": claimed.url,
                    "error": error,
                },
            )

    async def send(self, claimed: store.Claimed) -> tuple[int | None, str | None]:
        """POST the delivery: its answer's status, and what failed (None for a 2xx)."""
        try:
            _, refusal = check_url(claimed.url)
        except ValueError as exc:
            return None, f"refused: the URL {exc}"
        if refusal is not None and not self.settings.webhook_allow_private:
            return None, f"refused: {refusal}"
        timestamp = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(timestamp, claimed.body, claimed.signing),
            "Tally-Event-Type": claimed.event_type,
        }
        try:
            post = self.session.post(claimed.url, data=claimed.body, headers=headers, allow_redirects=False)
            async with post as resp:
                # The status is the answer; a few KB are read so that a short body ends the
                # exchange cleanly, and the connection is closed rather than drain a long one.
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await resp.content.read(RESPONSE_BYTES)
                resp.close()
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefused):
                return None, f"refused: {exc.os_error}"
            return None, _describe(exc)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return None, _describe(exc)
        if 200 <= status < 300:
            return status, None
        if 300 <= status < 400:
            return status, f"HTTP {status}: redirects are not followed"
        return status, f"HTTP {status}"

    # ---- what operators watch ----------------------------------------------------------------

    async def watch_backlog(self) -> None:
        async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
            oldest, disabled = await store.backlog(conn)
        age = 0.0 if oldest is None else max(0.0, self.clock() - oldest.timestamp())
        metrics.WEBHOOK_OLDEST_PENDING.set(age)
        metrics.WEBHOOK_ENDPOINTS_DISABLED.set(disabled)

    async def purge(self) -> None:
        before = self.now() - timedelta(days=self.settings.webhook_delivery_retention_days)
        async with self.pool.acquire(timeout=self.settings.db_connect_timeout) as conn:
            purged = await store.purge_finished(conn, before)
        if purged:
            log.info("purged finished webhook deliveries", extra={"count": purged})


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


def running(dispatcher: Dispatcher) -> contextlib.AbstractAsyncContextManager[Any]:
    """The dispatcher's loop as a task for the life of the context."""

    @contextlib.asynccontextmanager
    async def context() -> Any:
        task = asyncio.create_task(dispatcher.run(), name="tally-webhooks")
        try:
            yield dispatcher
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await dispatcher.close()

    return context()
