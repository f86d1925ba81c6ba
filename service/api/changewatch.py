"""What this API process has been told about commits: a data version per organization and
environment, bumped by each notification on the change log's channel
(service/store/changelog.py), which PostgreSQL delivers when a transaction that changed
customers commits — whichever process (a consumer's fold, another API replica) made it.

The read cache (service/api/readcache.py) keys its entries by these versions, so a response
is served from memory only until the process hears of a commit that may have changed it. While
the listener is not connected nothing can be known, and :meth:`ChangeWatch.version` answers
None (the cache is bypassed); each reconnection starts a new epoch, so nothing cached before a
gap in listening is used after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar
from uuid import UUID

import asyncpg

from service.api.listener import keep_listening
from service.infra import metrics
from service.infra.waits import wait_event
from service.store.changelog import CHANNEL, parse_notice

T = TypeVar("T")

RELISTEN_DELAY = 1.0
# A quiet listener connection is checked this often, and given this long to answer.
PING_EVERY = 10.0
PING_TIMEOUT = 5.0

Scope = tuple[UUID, str]  # (organization_id, environment)


class ChangeWatch:
    """Data versions per (organization, environment)."""

    def __init__(self) -> None:
        self.listening = False
        self.epoch = 0
        self._versions: dict[Scope, int] = {}
        # Tasks waiting for a scope's next version (live change streams: service/api/changefeed.py).
        self._waiters: dict[Scope, set[asyncio.Event]] = {}

    def version(self, scope: Scope) -> tuple[int, int] | None:
        """``(epoch, version)`` of ``scope`` as this process knows it; None while not listening."""
        if not self.listening:
            return None
        return self.epoch, self._versions.get(scope, 0)

    def bump(self, scope: Scope) -> int:
        """A commit may have changed ``scope``'s customers (heard, or made by this process);
        returns the new version."""
        version = self._versions[scope] = self._versions.get(scope, 0) + 1
        for waiter in self._waiters.get(scope, ()):
            waiter.set()
        return version

    def wake(self) -> None:
        """Every wait in :meth:`changed` returns now (a new epoch, or the process shutting down)."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.set()

    def restart(self) -> None:
        """A new epoch: what was heard before is forgotten (notifications may have been missed)."""
        self.epoch += 1
        self._versions.clear()
        self.wake()

    async def changed(self, scope: Scope, since: tuple[int, int] | None, timeout: float) -> bool:
        """Wait until ``scope``'s version is no longer ``since`` (a commit heard, or a new
        epoch: notifications may have been missed), for at most ``timeout`` seconds; whether it
        changed. While not listening nothing can be heard: the wait lasts ``timeout``."""
        if self.version(scope) != since:
            return True
        waiter = asyncio.Event()
        waiters = self._waiters.setdefault(scope, set())
        waiters.add(waiter)
        try:
            await wait_event(waiter, timeout)
        finally:
            waiters.discard(waiter)
            if not waiters and self._waiters.get(scope) is waiters:
                del self._waiters[scope]
        return self.version(scope) != since


@asynccontextmanager
async def listening(dsn: str, connect_timeout: float, watch: ChangeWatch | None = None) -> AsyncIterator[ChangeWatch]:
    """A ChangeWatch kept current by a listener connection of its own to the primary
    (reconnecting after RELISTEN_DELAY), for the life of the block."""
    watch = watch or ChangeWatch()
    stop = asyncio.Event()

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object, /) -> None:
        scope = parse_notice(str(payload))
        if scope is not None:
            watch.bump(scope)

    async def follow(conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        watch.restart()
        watch.listening = True
        metrics.CHANGE_LISTENER_UP.set(1)
        while True:
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())]
            try:
                done, _ = await asyncio.wait(waits, timeout=PING_EVERY, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
            if done:
                return
            # Quiet for a while: a connection a NAT or load balancer dropped silently would hear
            # nothing ever again; one that does not answer makes the listener start over (and
            # the cache forget everything meanwhile).
            await conn.fetchval("SELECT 1", timeout=PING_TIMEOUT)

    def ended() -> None:
        watch.listening = False
        metrics.CHANGE_LISTENER_UP.set(0)
        watch.restart()

    task = asyncio.create_task(
        keep_listening(
            dsn,
            connect_timeout,
            CHANNEL,
            on_notify,
            what="change listener (reads are not cached meanwhile)",
            stop=stop,
            follow=follow,
            ended=ended,
            relisten_delay=RELISTEN_DELAY,
        ),
        name="tally-change-listener",
    )
    try:
        yield watch
    finally:
        stop.set()
        await task


class SharedReads(Generic[T]):
    """Single-flight reads: a read asked while the same one (by ``key``) is in flight joins it
    instead of running again. The streams of a scope that one commit wakes all ask for the
    changes after the same position: one database read serves them, where each reading alone
    made the reads grow with the streams (bench/streams.py measured it).

    The caller's key must make joining correct: it names the scope, the position, the filters
    and the change-watch version the caller saw before reading. A read keyed by that version
    started after the caller saw it, so it sees every commit the caller was told of."""

    def __init__(self) -> None:
        self._flight: dict[Hashable, asyncio.Future[T]] = {}
        self.joined = 0  # reads served by another's flight, for tests and metrics

    async def read(self, key: Hashable, run: Callable[[], Awaitable[T]]) -> T:
        flight = self._flight.get(key)
        if flight is None:
            flight = asyncio.ensure_future(run())
            self._flight[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        else:
            self.joined += 1
        # One reader going away (its client left) must not cancel the read for the others.
        return await asyncio.shield(flight)

    def _landed(self, key: Hashable, flight: asyncio.Future[T]) -> None:
        if self._flight.get(key) is flight:
            del self._flight[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: every reader may have gone before it failed


class StreamSlots:
    """Live change streams of this process (service/api/changefeed.py): at most ``per_key``
    open per API key, and the signal that ends them all when the process shuts down (a stream
    never ends by itself: SIGTERM's drain would otherwise wait out its whole timeout)."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._open: dict[str, int] = {}
        self.stopping = asyncio.Event()
        self.reads: SharedReads[Any] = SharedReads()

    def take(self, client_key: str) -> bool:
        """One more stream for ``client_key``, or False when it holds ``per_key`` already."""
        held = self._open.get(client_key, 0)
        if held >= self.per_key:
            return False
        self._open[client_key] = held + 1
        metrics.CHANGE_STREAMS_OPEN.inc()
        return True

    def give_back(self, client_key: str) -> None:
        held = self._open.pop(client_key) - 1
        if held:
            self._open[client_key] = held
        metrics.CHANGE_STREAMS_OPEN.dec()
