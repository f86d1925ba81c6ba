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

K = TypeVar("K", bound=Hashable)
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


class SharedReads(Generic[K, T]):
    """Single-flight, batched reads. A read asked while the same one (by ``key``) is waiting
    or in flight joins it instead of running again; the different reads asked meanwhile run
    together, as one call of ``run`` with all their keys, as soon as the batch before them
    has landed. The streams that one commit wakes all ask at once: their reads, of every
    organization with streams in this process, cost one round of statements, where a read per
    organization made the reads grow with the organizations (bench/streams.py measured both).

    The caller's key must make joining correct: it names the read (scope, position, filters)
    and the change-watch version the caller saw before asking. A batch that holds that key
    started after some caller saw that version, and nothing was heard between (the version is
    the same), so it sees every commit the later caller was told of."""

    def __init__(self, run: Callable[[list[K]], Awaitable[list[T]]]) -> None:
        self._run = run
        self._flight: dict[K, asyncio.Future[T]] = {}
        self._waiting: list[K] = []
        self._running: asyncio.Task[None] | None = None
        self.joined = 0  # reads served by another's flight, for tests and metrics
        self.batches = 0  # calls of ``run``

    async def read(self, key: K) -> T:
        flight = self._flight.get(key)
        if flight is None:
            flight = self._flight[key] = asyncio.get_running_loop().create_future()
            self._waiting.append(key)
            if self._running is None:
                self._running = asyncio.create_task(self._drain(), name="tally-shared-reads")
        else:
            self.joined += 1
        # One reader going away (its client left) must not cancel the read for the others.
        return await asyncio.shield(flight)

    async def _drain(self) -> None:
        batch: list[K] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                self.batches += 1
                try:
                    results = await self._run(batch)
                except Exception as exc:
                    for key in batch:
                        self._land(key).set_exception(exc)
                else:
                    for key, result in zip(batch, results, strict=True):
                        self._land(key).set_result(result)
                batch = []
        finally:
            self._running = None
            for key in [*batch, *self._waiting]:  # cancelled (shutdown): nobody waits in vain
                self._land(key).cancel()
            self._waiting = []

    def _land(self, key: K) -> asyncio.Future[T]:
        flight = self._flight.pop(key)
        # Retrieved when set: every reader may have gone before it failed.
        flight.add_done_callback(lambda done: done.cancelled() or done.exception())
        return flight


class StreamSlots:
    """Live change streams of this process (service/api/changefeed.py): at most ``per_key``
    open per API key, and the signal that ends them all when the process shuts down (a stream
    never ends by itself: SIGTERM's drain would otherwise wait out its whole timeout)."""

    def __init__(self, per_key: int, reads: SharedReads[Any, Any]) -> None:
        self.per_key = per_key
        self._open: dict[str, int] = {}
        self.stopping = asyncio.Event()
        self.reads = reads

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
