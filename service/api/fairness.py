"""Fair sharing of an API process's work between organizations, measured in cost, not requests.

A request's cost is what it takes from everyone else: the event-loop CPU its handler uses
(measured per step of its coroutine, so that time spent waiting is not counted), the time it
holds a database connection (service/api/dbaccess.py adds it), and what its head and body
cost to read. One organization's requests can cost a hundred times another's at the same
request rate — a body parsed and refused, a filter that scans every customer — so the per-key
request rate cannot keep tenants apart.

Each organization has a *share*: ``TALLY_ORG_SHARE_SECONDS`` seconds of cost per second, with
a burst of ``TALLY_ORG_SHARE_BURST`` seconds, kept as a token bucket in cost-seconds, and at
most ``TALLY_ORG_CONCURRENCY`` requests in progress. A request is charged up front with what
its kind is expected to cost — the running average of the organization's requests on its route,
or of everyone's there — so that a burst of concurrent expensive requests cannot all be admitted
before any of them is paid for, and the difference when it ends. An organization whose bucket
does not hold the charge, or with as many requests in progress as it may have, is shed (429,
Retry-After) while another active organization is within its share, or uses less than it does:
alone, a tenant may use the whole machine; in company, the users past their share wait — the
heaviest first when several are, never the light ones, whose measured cost, inflated by the very
contention others cause, could otherwise run out too.
Shed requests are answered after a delay (``TALLY_SHED_DELAY``), so that a client retrying at
once cannot turn cheap refusals into a flood of its own.

CPU-heavy stretches of a handler (validating a batch of events) run in slices that take turns
on one :class:`CpuSlot`, so that however many such requests are in flight, a light request
waits behind at most one slice at each of its steps.

Across API replicas the shares (and the per-key request rate, service/api/ratelimit.py) are
divided by the number of live replicas (:class:`Replicas`, a heartbeat row per process in
PostgreSQL): exact when a load balancer spreads an organization's requests evenly, and never
more than the configured share in all. No request pays a database round trip for it.
"""

from __future__ import annotations

import asyncio
import logging
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
from service.infra.errors import is_transient
from service.infra.waits import wait_event

log = logging.getLogger("tally.fairness")

T = TypeVar("T")
K = TypeVar("K")

# Cost a request is charged beyond its handler: aiohttp's parsing of its head and writing of
# its response (measured at 0.1-0.2 ms here), and reading its body (~2.5 µs per KB).
REQUEST_OVERHEAD = 0.0002
BODY_BYTE_COST = 2.5e-9
# An organization's rate of use is averaged over about this many seconds.
USAGE_SECONDS = 2.0
# An organization counts as active for this long after its last request started.
ACTIVE_WINDOW = 1.0
# The running average cost per request moves by this much of each new request's cost.
AVERAGE_WEIGHT = 0.2
MAX_ORGANIZATIONS = 100_000


class LoopLag:
    """How long a ready callback currently waits for the event loop (seconds): sampled every
    SAMPLE_SECONDS by a timer that measures how late it fires, and smoothed."""

    SAMPLE_SECONDS = 0.01

    def __init__(self) -> None:
        self.current = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.SAMPLE_SECONDS
            await asyncio.sleep(self.SAMPLE_SECONDS)
            late = max(0.0, loop.time() - due)
            self.current += 0.3 * (late - self.current)


@dataclass
class CostMeter:
    """What one request has cost so far: event-loop CPU, database time, and reading its head
    and body (s).

    Database time is the time the request waits on a connection it holds — less what the
    waiting cost the event loop's queue: a reply that sits behind other tenants' work before
    the request resumes is not the database's work, and charging it would make the light
    tenants pay for the contention the heavy ones cause. Each resumption is assumed to have
    waited the loop's current lag twice (once for the socket's callback, once for the task)."""

    lag: LoopLag | None = None
    cpu: float = 0.0
    db: float = 0.0
    body_bytes: int = 0
    holding: int = 0  # database connections held now

    @property
    def total(self) -> float:
        return self.cpu + self.db + REQUEST_OVERHEAD + self.body_bytes * BODY_BYTE_COST


class _Metered(Generic[T]):
    """Awaits a coroutine, adding the time each of its steps held the event loop to a meter.
    The steps are the stretches the coroutine runs on the loop between suspensions: the loop
    runs nothing else meanwhile, so their sum is the loop time this request took from every
    other one. Read with the monotonic clock (0.1 µs a reading here) rather than the thread's
    CPU clock (a system call: 1.8 µs), which cost a retrieve 7 % of its CPU."""

    __slots__ = ("_coro", "_meter")

    def __init__(self, awaitable: Awaitable[T], meter: CostMeter) -> None:
        self._coro = awaitable
        self._meter = meter

    def __await__(self) -> Generator[Any, Any, T]:
        inner = self._coro.__await__()
        meter = self._meter
        value: Any = None
        error: BaseException | None = None
        suspended: float | None = None
        while True:
            if suspended is not None and meter.holding:
                queued = 2 * meter.lag.current if meter.lag is not None else 0.0
                meter.db += max(0.0, time.perf_counter() - suspended - queued)
            started = time.perf_counter()
            try:
                if error is None:
                    awaited = inner.send(value)
                else:
                    thrown, error = error, None
                    awaited = inner.throw(thrown)
            except StopIteration as stop:
                meter.cpu += time.perf_counter() - started
                result: T = stop.value
                return result
            except BaseException:
                meter.cpu += time.perf_counter() - started
                raise
            meter.cpu += time.perf_counter() - started
            suspended = time.perf_counter()
            try:
                value = yield awaited
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
    route: str = ""


@dataclass
class _Share:
    tokens: float  # cost-seconds left (negative: owed)
    updated: float
    average: float = REQUEST_OVERHEAD  # running average cost of this organization's requests
    charged: float = 0.0  # what its requests in progress were charged up front
    # The organization's rate of use (cost-seconds per second), decaying over USAGE_SECONDS.
    usage: float = 0.0
    usage_at: float = 0.0

    def rate(self, now: float) -> float:
        return self.usage * math.exp(-(now - self.usage_at) / USAGE_SECONDS)


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

    def __init__(
        self,
        rate: float,
        burst: float,
        replicas: Replicas,
        concurrency: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.rate = rate
        self.burst = max(burst, rate)
        self.replicas = replicas
        # Requests one organization may have in progress in this process while others wait for
        # it: the work it can queue ahead of another tenant's request is bounded.
        self.concurrency = concurrency
        self._clock = clock
        self._shares: dict[UUID, _Share] = {}
        self._in_progress: dict[UUID, int] = {}
        # Running average cost per (organization, route), and per route (organization None).
        self._route_costs: dict[tuple[UUID | None, str], float] = {}
        # Requests in progress on a route whose cost for the organization is not known yet.
        self._learning: dict[tuple[UUID, str], int] = {}
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

    def weight(self, organization: UUID, share: _Share, now: float) -> float:
        """How heavily an organization uses the process now (cost-seconds per second): its
        recent use, and what its requests in progress are expected to cost (a request that
        runs for seconds weighs from its start, not only once it ends)."""
        return share.rate(now) + share.charged / USAGE_SECONDS

    def others_wait(self, organization: UUID, weight: float, now: float) -> bool:
        """Whether another organization started a request within ACTIVE_WINDOW that is within
        its share or weighs less than ``weight``: one that must not wait for this one."""
        for org, seen in list(self._active.items()):
            if now - seen >= ACTIVE_WINDOW:
                del self._active[org]
            elif org == organization or (other := self._shares.get(org)) is None:
                continue
            elif other.tokens > 0 or self.weight(org, other, now) < weight:
                return True
        return False

    def expected(self, organization: UUID, route: str, share: _Share) -> float:
        """What a request of ``organization`` on ``route`` is expected to cost: the running
        average of its requests there, else of every organization's there (so that the first
        requests of an expensive kind are charged as such), else of its requests anywhere."""
        known = self._route_costs.get((organization, route))
        if known is None:
            known = self._route_costs.get((None, route), share.average)
        return known

    def admit(self, organization: UUID, route: str = "") -> Admission:
        """Charge ``organization`` what a request on ``route`` is expected to cost, or refuse
        it — while another organization that must not wait for it is active — if its bucket
        does not hold that, or as many of its requests as it may have are in progress."""
        if not self.enabled:
            return Admission(True)
        now = self._clock()
        share = self._refilled(organization, now)
        charge = self.expected(organization, route, share)
        in_progress = self._in_progress.get(organization, 0)
        # Until one of an organization's requests on a route has ended, what they cost is not
        # known: the first runs alone, so that an expensive kind is learned before a burst of
        # it runs at once.
        learning = (organization, route) not in self._route_costs and self._learning.get((organization, route), 0) > 0
        # The cap on requests in progress holds an organization that has spent half its burst:
        # one well within its share is never held back for how many requests it has waiting
        # (under contention every tenant's requests take longer, and so pile up).
        half = self.replicas.divide(self.burst) / 2
        over = share.tokens < charge or learning or (in_progress >= self.concurrency and share.tokens < half)
        if over and self.others_wait(organization, self.weight(organization, share, now), now):
            rate = self.replicas.divide(self.rate)
            return Admission(False, retry_after=max(1, math.ceil((charge - share.tokens) / rate)))
        self._active[organization] = now
        self._in_progress[organization] = in_progress + 1
        if (organization, route) not in self._route_costs:
            self._learning[(organization, route)] = self._learning.get((organization, route), 0) + 1
        share.tokens -= charge
        share.charged += charge
        return Admission(True, charged=charge, route=route)

    def settle(self, organization: UUID, admission: Admission, cost: float) -> None:
        """The request ended having cost ``cost`` seconds: charge the difference."""
        if not self.enabled or not admission.admitted:
            return
        _decrement(self._in_progress, organization)
        _decrement(self._learning, (organization, admission.route))
        now = self._clock()
        share = self._refilled(organization, now)
        share.charged = max(0.0, share.charged - admission.charged)
        share.tokens -= cost - admission.charged
        share.average += AVERAGE_WEIGHT * (cost - share.average)
        share.usage = share.rate(now) + cost / USAGE_SECONDS
        share.usage_at = now
        for key in ((organization, admission.route), (None, admission.route)):
            before = self._route_costs.get(key)
            self._route_costs[key] = cost if before is None else before + AVERAGE_WEIGHT * (cost - before)
        if len(self._route_costs) > MAX_ORGANIZATIONS:
            self._route_costs.clear()  # bounded memory; forgetting averages only re-learns them

    def usage(self, organization: UUID) -> float:
        """The organization's recent rate of use, in cost-seconds per second."""
        share = self._shares.get(organization)
        return share.rate(self._clock()) if share is not None else 0.0

    def tokens(self, organization: UUID) -> float:
        return self._refilled(organization, self._clock()).tokens


def _decrement(counts: dict[K, int], key: K) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class CpuSlot:
    """Turns on the event loop for CPU-heavy slices of work: ``async with slot: <a slice>``.
    One slice runs at a time and each waits its turn (first come, first served); after its
    slice a task goes to the back of the loop's queue, so a light request's steps interleave
    with heavy work instead of waiting behind every runnable slice of it."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()
        await asyncio.sleep(0)


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
        except Exception as exc:  # the count stays what it was; the next beat tries again
            if not is_transient(exc):
                log.error("replica heartbeat failed", extra={"error": repr(exc)})
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
        except Exception as exc:  # the row expires by itself within a few beats
            if not is_transient(exc):
                log.error("replica could not leave the heartbeat table", extra={"error": repr(exc)})
