"""Revocation against the per-process key cache: a lookup that read a
key as live before its revocation committed must never cache it after the revocation's
notification was handled, or the revoked key keeps working for the cache's TTL."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.api import appkeys, keycache
from service.api.app import create_app
from service.api.keycache import KeyCache
from service.core import auth
from service.core.errors import Unauthenticated
from tests.eventkit import wait_until
from tests.factories import Org

# How long a notification may take to reach the listener before the test gives up (a bound
# on a wait, never a sleep).
NOTIFY_TIMEOUT = 10
TURNS = 100


async def _authenticate(pool: asyncpg.Pool, client_key: str, secret: str) -> auth.Principal:
    async with pool.acquire() as conn:
        return await auth.authenticate(conn, client_key, secret)


async def test_a_lookup_older_than_a_handled_revocation_is_not_cached(settings, pool: asyncpg.Pool, org: Org) -> None:
    cache = KeyCache(ttl=30)
    async with keycache.listening(cache, settings.database_url, settings.db_connect_timeout):

        async def listening() -> bool:
            return cache.listening

        await wait_until(listening, timeout=NOTIFY_TIMEOUT, what="the key cache to listen")
        client_key, _, secret = org.read_key.partition(".")

        # Caching works: a lookup with no eviction since its generation is kept.
        generation = cache.generation
        principal = await _authenticate(pool, client_key, secret)
        cache.put(client_key, secret, principal, generation)
        assert cache.get(client_key, secret) == principal
        cache.evict(client_key)

        # The race, step by step: generation noted, the database says live...
        generation = cache.generation
        principal = await _authenticate(pool, client_key, secret)
        # ... the revocation commits elsewhere and its notification is handled here (evicting
        # nothing: the key is not cached) ...
        heard = cache.notifications
        async with pool.acquire() as conn:
            await auth.revoke_key(conn, client_key)
        await asyncio.wait_for(cache.notified(heard + 1), NOTIFY_TIMEOUT)
        # ... and only then does the lookup's answer arrive to be cached.
        cache.put(client_key, secret, principal, generation)

        assert cache.get(client_key, secret) is None
        with pytest.raises(Unauthenticated):
            await _authenticate(pool, client_key, secret)


async def test_a_key_revoked_during_its_first_concurrent_uses_is_refused_once_the_revocation_is_heard(
    settings, migrated, pool: asyncpg.Pool, org: Org
) -> None:
    """The probe's reproduction: a fresh key, 60 concurrent first requests, the revocation
    committed partway through them; once it committed, its notification was handled and the
    requests in flight finished, every new request with that key is a 401."""
    rng = random.Random(10)
    # Database turns generous enough that no first use is shed (fair sharing has its own tests).
    app = create_app(
        settings.model_copy(
            update={"auth_cache_seconds": 30.0, "db_org_concurrency": settings.db_pool_max, "db_acquire_timeout": 30.0}
        )
    )
    async with TestClient(TestServer(app)) as client:
        cache = app[appkeys.KEY_CACHE]

        async def listening() -> bool:
            return cache.listening

        await wait_until(listening, timeout=NOTIFY_TIMEOUT, what="the key cache to listen")
        stale = []
        for round_ in range(15):
            async with pool.acquire() as conn:
                key = (await auth.create_key(conn, org.name, ("read",))).key
            headers = {"Authorization": f"Bearer {key}"}

            async def first_use(headers: dict[str, str] = headers) -> int:
                async with client.get("/v1/customers?limit=1", headers=headers) as r:
                    return r.status

            in_flight = [asyncio.ensure_future(first_use()) for _ in range(60)]
            # Revoke partway through their key lookups: after a random number of event-loop
            # turns (the probe revoked 0-30 ms in; turns, unlike time, are the same on any machine).
            for _ in range(rng.randrange(0, TURNS)):
                await asyncio.sleep(0)
            heard = cache.notifications
            async with pool.acquire() as conn:
                await auth.revoke_key(conn, key)
            await asyncio.wait_for(cache.notified(heard + 1), NOTIFY_TIMEOUT)
            statuses = await asyncio.gather(*in_flight)
            assert set(statuses) <= {200, 401}, statuses

            after = [await first_use() for _ in range(3)]
            if after != [401, 401, 401]:
                stale.append((round_, after))
        assert not stale, f"revoked keys still served after the revocation was heard: {stale}"
