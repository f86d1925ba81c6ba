"""Every live API key held in memory by each API process, kept current by PostgreSQL NOTIFY.

A request's key is verified against what the process holds: the SHA-256 of each live key's
secret (never the secret), compared in constant time. So verification costs no database
round trip, and — what matters under attack — a flood of failed keys costs the database
nothing and never stands between a valid key and its answer: a key the process holds is
served or refused (wrong secret) in memory, whatever else its client address sent. Only a
client key the process does not hold (unknown, or created a moment ago and not yet heard of)
is looked up, and those lookups are what the per-address limit of failed keys guards
(service/api/routing.py).

Keeping it current: ``tally keys create`` and ``tally keys revoke`` notify channel
``tally_keys`` in their transaction (service/store/auth.py). The listener adds a created key
(read back by its client key) and evicts a revoked one as the change commits. When the
listener (re)starts, and every ``TALLY_AUTH_CACHE_SECONDS`` as a backstop, it reloads every
live key; while it is not listening the process holds nothing and every request is looked up.

A lookup races a revocation: it may read the key as live just before the revocation commits,
and its answer may come back after the notification was handled (evicting nothing, as the
key was not held yet). Holding that answer would keep a revoked key working until the next
reload. So the store has a *generation*, advanced by every eviction, clear, and listener start
or stop: a caller notes :attr:`KeyCache.generation` before its database read and passes it to
:meth:`KeyCache.put` (or :meth:`KeyCache.replace`), which holds nothing if the generation moved
meanwhile. A read that began after the notification was handled began after the revocation
committed, and so reads the key as revoked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from service.api.listener import keep_listening
from service.domain.keys import CREATED_MARK, KEYS_CHANNEL, LiveKey, Principal, hash_secret
from service.store import auth

# Keys held at most (about 300 bytes each). Past it, the keys beyond are looked up per request
# (and held while there is room), as keys not yet heard of are.
MAX_ENTRIES = 200_000
RELISTEN_DELAY = 2.0


class KeyCache:
    def __init__(self, reload_seconds: float) -> None:
        self.reload_seconds = reload_seconds
        self._listening = False  # only a listening store answers from memory
        self._entries: dict[str, LiveKey] = {}
        self._generation = 0
        # Revocation notifications handled so far, awaitable (tests, and anyone who must know
        # that a revocation has reached this process).
        self.notifications = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Client keys whose creation was heard and that are still to be read, and a flag that
        # wakes the listener to read them.
        self.created: list[str] = []
        self.created_heard = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return self.reload_seconds > 0

    @property
    def generation(self) -> int:
        """Note this before a database read; pass it to :meth:`put` with the result."""
        return self._generation

    @property
    def listening(self) -> bool:
        return self._listening

    @listening.setter
    def listening(self, value: bool) -> None:
        # Keys read on either side of a listener (re)start or stop may have missed a
        # notification: reads in flight across it must not be held.
        self._listening = value
        self._generation += 1

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, client_key: str, secret: str) -> Principal | None:
        """The principal of a held key whose secret this is, else None."""
        if not self.listening or not self.enabled:
            return None
        entry = self._entries.get(client_key)
        return entry.verify(secret) if entry is not None else None

    def holds(self, client_key: str) -> bool:
        """Whether ``client_key`` is a live key held here: a secret that does not verify
        against it is wrong, without asking the database."""
        return self.listening and self.enabled and client_key in self._entries

    def put(self, client_key: str, secret: str, principal: Principal, generation: int) -> None:
        """Hold ``principal``, read from the database (with ``secret`` verified) after
        :attr:`generation` was ``generation``; nothing is held if an eviction (or clear)
        happened since, as the read may predate a revocation already handled."""
        self.add(client_key, LiveKey(hash_secret(secret), principal), generation)

    def add(self, client_key: str, key: LiveKey, generation: int) -> None:
        if not self.listening or not self.enabled or generation != self._generation:
            return
        if len(self._entries) < MAX_ENTRIES or client_key in self._entries:
            self._entries[client_key] = key

    def replace(self, keys: dict[str, LiveKey], generation: int) -> bool:
        """Hold exactly ``keys`` (every live key, read after :attr:`generation` was
        ``generation``); False, holding nothing new, if an eviction happened since."""
        if not self.listening or generation != self._generation:
            return False
        self._entries = keys
        return True

    def evict(self, client_key: str) -> None:
        self._generation += 1
        self._entries.pop(client_key, None)

    def clear(self) -> None:
        self._generation += 1
        self._entries = {}

    def revoked(self, client_key: str) -> None:
        """A revocation notification: evict the key and count the notification."""
        self.evict(client_key)
        self.notifications += 1
        for target, waiter in self._waiters:
            if target <= self.notifications and not waiter.done():
                waiter.set_result(None)

    def heard(self, payload: str) -> None:
        """A notification on KEYS_CHANNEL: a creation to read, or a revocation."""
        if payload.startswith(CREATED_MARK):
            self.created.append(payload.removeprefix(CREATED_MARK))
            self.created_heard.set()
        else:
            self.revoked(payload)

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


async def _reload(cache: KeyCache, conn: asyncpg.Connection) -> None:
    """Hold every live key; read again if a revocation was handled during the read."""
    while cache.listening:
        generation = cache.generation
        keys = await auth.live_keys(conn, MAX_ENTRIES)
        if cache.replace(keys, generation):
            return


async def _read_created(cache: KeyCache, conn: asyncpg.Connection) -> None:
    cache.created_heard.clear()
    while cache.created:
        client_key = cache.created.pop(0)
        generation = cache.generation
        key = await auth.live_key(conn, client_key)
        if key is not None:
            cache.add(client_key, key, generation)


@asynccontextmanager
async def listening(cache: KeyCache, dsn: str, connect_timeout: float) -> AsyncIterator[KeyCache]:
    """Keep a LISTEN connection for the store's lifetime (re-established when it drops): load
    every live key, follow creations and revocations, reload every ``reload_seconds``."""
    stop = asyncio.Event()

    def on_notify(_conn: object, _pid: int, _channel: str, payload: object, /) -> None:
        cache.heard(str(payload))

    async def follow(conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_reload = loop.time() + cache.reload_seconds
        while not stop.is_set() and not lost.is_set():
            await _read_created(cache, conn)
            if loop.time() >= next_reload:
                await _reload(cache, conn)
                next_reload = loop.time() + cache.reload_seconds
            waiters = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(lost.wait()),
                asyncio.ensure_future(cache.created_heard.wait()),
            ]
            try:
                await asyncio.wait(
                    waiters, timeout=max(0.0, next_reload - loop.time()), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def run(conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        cache.clear()  # anything held while not listening may be stale
        cache.listening = True
        await _reload(cache, conn)
        await follow(conn, lost)

    def ended() -> None:
        cache.listening = False
        cache.clear()

    if not cache.enabled:
        yield cache
        return
    task = asyncio.create_task(
        keep_listening(
            dsn,
            connect_timeout,
            KEYS_CHANNEL,
            on_notify,
            what="key store listener (every key is looked up meanwhile)",
            stop=stop,
            follow=run,
            ended=ended,
            relisten_delay=RELISTEN_DELAY,
        ),
        name="tally-key-store",
    )
    try:
        yield cache
    finally:
        stop.set()
        await task
