"""A per-process cache of verified API keys, invalidated by PostgreSQL NOTIFY.

Without it every request pays a second database round trip to look its key up. An entry
holds the SHA-256 of the secret that was verified against the database, so a cached key
is still checked in constant time against what the caller sends. ``tally keys revoke``
notifies channel ``tally_keys`` in its transaction; every API process listening evicts
the key as the revocation commits. Entries also expire after ``ttl`` seconds, which bounds
the damage if a notification were missed (the listener connection is re-established, and
the cache emptied, whenever it drops).

A lookup races a revocation: it may read the key as live just before the revocation
commits, and its answer may come back after the notification was handled (evicting
nothing, as the key was not cached yet). Caching that answer would keep a revoked key
working for ``ttl`` seconds. So the cache has a *generation*, advanced by every eviction,
clear, and listener start or stop: a caller notes :meth:`KeyCache.generation` before its
database lookup and passes it to :meth:`KeyCache.put`, which caches nothing if the
generation moved meanwhile. A lookup that began after the notification was handled began
after the revocation committed, and so reads the key as revoked.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from service.core.auth import KEYS_CHANNEL, Principal, hash_secret
from service.infra.waits import wait_event

log = logging.getLogger("tally.keys")

MAX_ENTRIES = 10_000
RELISTEN_DELAY = 2.0


class KeyCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._listening = False  # only a listening cache serves entries
        self._entries: dict[str, tuple[bytes, Principal, float]] = {}
        self._generation = 0
        # Revocation notifications handled so far, awaitable (tests, and anyone who must know
        # that a revocation has reached this process).
        self.notifications = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def generation(self) -> int:
        """Note this before a database lookup; pass it to :meth:`put` with the result."""
        return self._generation

    @property
    def listening(self) -> bool:
        return self._listening

    @listening.setter
    def listening(self, value: bool) -> None:
        # Entries cached on either side of a listener (re)start or stop may have missed a
        # notification: lookups in flight across it must not cache what they read.
        self._listening = value
        self._generation += 1

    def get(self, client_key: str, secret: str) -> Principal | None:
        if not self.listening or self.ttl <= 0:
            return None
        entry = self._entries.get(client_key)
        if entry is None:
            return None
        secret_hash, principal, expires = entry
        if time.monotonic() > expires:
            self._entries.pop(client_key, None)
            return None
        # A wrong secret for a cached key falls through to the database (and a 401 there).
        return principal if hmac.compare_digest(secret_hash, hash_secret(secret)) else None

    def put(self, client_key: str, secret: str, principal: Principal, generation: int) -> None:
        """Cache ``principal``, read from the database after :attr:`generation` was
        ``generation``; nothing is cached if an eviction (or clear) happened since, as
        the lookup may predate a revocation whose notification has already been handled."""
        if not self.listening or self.ttl <= 0 or generation != self._generation:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()  # bounded memory; forgetting entries only costs lookups
        self._entries[client_key] = (hash_secret(secret), principal, time.monotonic() + self.ttl)

    def evict(self, client_key: str) -> None:
        self._generation += 1
        self._entries.pop(client_key, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()

    def revoked(self, client_key: str) -> None:
        """A revocation notification: evict the key and count the notification."""
        self.evict(client_key)
        self.notifications += 1
        for target, waiter in self._waiters:
            if target <= self.notifications and not waiter.done():
                waiter.set_result(None)

    async def notified(self, count: int) -> None:
        """Return once ``count`` revocation notifications in all have been handled."""
        if self.notifications >= count:
            return
        entry = (count, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        finally:
            self._waiters.remove(entry)


@asynccontextmanager
async def listening(cache: KeyCache, dsn: str, connect_timeout: float) -> AsyncIterator[KeyCache]:
    """Keep a LISTEN connection for the cache's lifetime, re-established when it drops."""
    stop = asyncio.Event()

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object, /) -> None:
        cache.revoked(str(payload))

    async def keep_listening() -> None:
        while not stop.is_set():
            try:
                conn = await asyncpg.connect(dsn, timeout=connect_timeout)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning("key cache listener cannot connect; caching off", extra={"error": repr(exc)})
                await _sleep_or_stop(stop, RELISTEN_DELAY)
                continue
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            try:
                await conn.add_listener(KEYS_CHANNEL, on_notify)
                cache.clear()  # anything cached while not listening may be stale
                cache.listening = True
                waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())]
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("key cache listener failed", extra={"error": repr(exc)})
            finally:
                cache.listening = False
                cache.clear()
                if not conn.is_closed():
                    await conn.close(timeout=connect_timeout)
            if not stop.is_set():
                await _sleep_or_stop(stop, RELISTEN_DELAY)

    task = asyncio.create_task(keep_listening(), name="tally-key-cache")
    try:
        yield cache
    finally:
        stop.set()
        await task


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    await wait_event(stop, seconds)
