"""Fair sharing of an API process's work between organizations, measured in cost, not requests.

A request's cost is what it takes from everyone else: the event-loop CPU its handler uses
(measured per step of its coroutine, so that time spent waiting is not counted) and the time
it holds a database connection (service/api/dbaccess.py adds it). One organization's requests
can cost a hundred times another's at the same request rate — a body parsed and refused, a
filter that scans every customer — so the per-key request rate cannot keep tenants apart.

Each organization has a *share*: ``TALLY_ORG_SHARE_SECONDS`` seconds of cost per second, with
a burst of ``TALLY_ORG_SHARE_BURST`` seconds, kept as a token bucket in cost-seconds. A request
is charged up front with the organization's running average cost (so that a burst of
concurrent expensive requests cannot all be admitted before any of them is paid for), and the
difference when it ends. An organization whose bucket is empty is shed (429, Retry-After) —
but only while another organization is active in the process: alone, a tenant may use the
whole machine; with company, it gets its share. Shed requests are answered after a delay
(``TALLY_SHED_DELAY``), so that a client retrying at once cannot turn cheap refusals into a
flood of its own.

Across API replicas the shares (and the per-key request rate, service/api/ratelimit.py) are
divided by the number of live replicas (:class:`Replicas`, a heartbeat row per process in
PostgreSQL): exact when a load balancer spreads an organization's requests evenly, and never
more than the configured share in all. No request pays a database round trip for it.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from uuid import UUID

import asyncpg

from service.infra import metrics
from service.infra.waits import wait_event

T = TypeVar("T")

# Cost a request is charged beyond its handler: aiohttp's parsing of its head and writing of
# its response (measured at 0.1-0.2 ms here).
REQUEST_OVERHEAD = 0.0002
# An organization counts as active for this long after its last request started.
ACTIVE_WINDOW = 1.0
# The running average cost per request moves by this much of each new request's cost.
AVERAGE_WEIGHT = 0.2
MAX_ORGANIZATIONS = 100_000


@dataclass
class CostMeter:
    """What one request has cost so far: event-loop CPU and database connection time (s)."""

    cpu: float = 0.0
    db: float = 0.0

    @property
    def total(self) -> float:
        return self.cpu + self.db + REQUEST_OVERHEAD


class _Metered(Generic[T]):
    """Awaits a coroutine, adding the thread CPU time of each of its steps to a meter. The
    steps are the stretches the coroutine runs on the event loop between suspensions, so the
    sum is the loop time this request took from every other one."""

    __slots__ = ("_coro", "_meter")

    def __init__(self, awaitable: Awaitable[T], meter: CostMeter) -> None:
        self._coro = awaitable
        self._meter = meter

    def __await__(self) -> Generator[Any, Any, T]:
        inner = self._coro.__await__()
        meter = self._meter
        value: Any = None
        error: BaseException | None = None
        while True:
            started = time.thread_time()
            try:
                if error is None:
                    suspended = inner.send(value)
                else:
                    thrown, error = error, None
                    suspended = inner.throw(thrown)
            except StopIteration as stop:
                meter.cpu += time.thread_time() - started
                result: T = stop.value
                return result
            except BaseException:
                meter.cpu += time.thread_time() - started
                raise
            meter.cpu += time.thread_time() - started
            try:
                value = yield suspended
            except GeneratorExit:
                inner.close()
                raise
            except BaseException as exc:  # delivered into the coroutine, as a Task would (cancellation too)
                error, value = exc, None


def metered(awaitable: Awaitable[T], meter: CostMeter) -> Awaitable[T]:
    """``await metered(handler(request), meter)``: the handler, with its loop time counted."""
    return _Metered(awaitable, meter)


@dataclass
class Admission:
    """An organization's turn: admitted (with what it was charged up front), or refused with
    the seconds until its bucket holds the charge again."""

    admitted: bool
    charged: float = 0.0
    retry_after: int = 0


@dataclass
class _Share:
    tokens: float  # cost-seconds left (negative: owed)
    updated: float
    average: float = REQUEST_OVERHEAD  # running average cost of this organization's requests


class Replicas:
    """How many API processes are live (this one included), from their heartbeats: the
    divisor of every limit that must hold across replicas."""

    def __init__(self) -> None:
        self.count = 1
        self.id = uuid.uuid4()

    def divide(self, amount: float) -> float:
        return amount / max(1, self.count)


class OrgShares:
    """Per-organization cost buckets of one API process (see the module docstring)."""

    def __init__(self, rate: float, burst: float, replicas: Replicas, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = max(burst, rate)
        self.replicas = replicas
        self._clock = clock
        self._shares: dict[UUID, _Share] = {}
        # Organizations whose requests started within ACTIVE_WINDOW, and when (pruned as read).
        self._active: dict[UUID, float] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _refilled(self, organization: UUID, now: float) -> _Share:
        rate, burst = self.replicas.divide(self.rate), self.replicas.divide(self.burst)
        share = self._shares.get(organization)
        if share is None:
            if len(self._shares) >= MAX_ORGANIZATIONS:
                self._forget(now)
            share = self._shares[organization] = _Share(tokens=burst, updated=now)
        # A tenant alone may run its bucket below zero; the debt it carries into company is
        # bounded by one burst, so it is shed for a few seconds at most, never minutes.
        share.tokens = min(burst, max(-burst, share.tokens) + (now - share.updated) * rate)
        share.updated = now
        return share

    def _forget(self, now: float) -> None:
        """Drop organizations idle long enough to have a full bucket (nothing is lost)."""
        full = 2 * self.burst / self.rate + ACTIVE_WINDOW
        self._shares = {org: s for org, s in self._shares.items() if now - s.updated < full}
        if len(self._shares) >= MAX_ORGANIZATIONS:
            self._shares.clear()

    def others_active(self, organization: UUID, now: float) -> bool:
        """Whether another organization's request started within ACTIVE_WINDOW."""
        for org, seen in list(self._active.items()):
            if now - seen >= ACTIVE_WINDOW:
                del self._active[org]
            elif org != organization:
                return True
        return False

    def admit(self, organization: UUID) -> Admission:
        """Charge ``organization`` its average request cost, or refuse it if its bucket is
        empty while another organization is active."""
        if not self.enabled:
            return Admission(True)
        now = self._clock()
        share = self._refilled(organization, now)
        if share.tokens < share.average and self.others_active(organization, now):
            rate = self.replicas.divide(self.rate)
            return Admission(False, retry_after=max(1, math.ceil((share.average - share.tokens) / rate)))
        self._active[organization] = now
        share.tokens -= share.average
        return Admission(True, charged=share.average)

    def settle(self, organization: UUID, admission: Admission, cost: float) -> None:
        """The request ended having cost ``cost`` seconds: charge the difference."""
        if not self.enabled or not admission.admitted:
            return
        share = self._refilled(organization, self._clock())
        share.tokens -= cost - admission.charged
        share.average += AVERAGE_WEIGHT * (cost - share.average)

    def tokens(self, organization: UUID) -> float:
        return self._refilled(organization, self._clock()).tokens


class Tarpit:
    """Delays shed answers (a 429 sent at once invites the next request at once), holding at
    most ``capacity`` at a time: past that, refusals go out without delay."""

    def __init__(self, delay: float, capacity: int = 1000) -> None:
        self.delay = delay
        self.capacity = capacity
        self.holding = 0

    async def hold(self, retry_after: float) -> None:
        seconds = min(self.delay, retry_after)
        if seconds <= 0 or self.holding >= self.capacity:
            return
        self.holding += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            self.holding -= 1


# ---- the replica heartbeat ----------------------------------------------------------------------

# A replica whose heartbeat is older than this many beats is gone (crashed, or partitioned away).
HEARTBEAT_EXPIRY_BEATS = 3
BEAT = """
WITH beat AS (
    INSERT INTO api_replicas (id, seen_at) VALUES ($1, now())
    ON CONFLICT (id) DO UPDATE SET seen_at = now()
), expired AS (
    DELETE FROM api_replicas WHERE seen_at < now() - interval '1 hour'
)
SELECT 1 + count(*) FROM api_replicas WHERE seen_at > now() - make_interval(secs => $2) AND id <> $1
"""
LEAVE = "DELETE FROM api_replicas WHERE id = $1"


async def heartbeat(replicas: Replicas, pool: asyncpg.Pool, every: float, stop: asyncio.Event) -> None:
    """Beat every ``every`` seconds until ``stop``; keep the last known count when the database
    does not answer (a replica cannot be sure of the others then, and keeps what it knew)."""
    while not stop.is_set():
        try:
            async with pool.acquire(timeout=every) as conn:
                expiry = every * HEARTBEAT_EXPIRY_BEATS
                replicas.count = int(await conn.fetchval(BEAT, replicas.id, expiry, timeout=every))
            metrics.API_REPLICAS.set(replicas.count)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass
        await wait_event(stop, every)


@asynccontextmanager
async def running_heartbeat(replicas: Replicas, pool: asyncpg.Pool, every: float) -> AsyncIterator[None]:
    """The heartbeat for the block's lifetime (none when ``every`` is 0: this process's
    limits are its own); the replica leaves (its row deleted) at the end."""
    if every <= 0:
        yield
        return
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeat(replicas, pool, every, stop), name="tally-replica-heartbeat")
    try:
        yield
    finally:
        stop.set()
        await task
        try:
            async with pool.acquire(timeout=every) as conn:
                await conn.execute(LEAVE, replicas.id)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass
