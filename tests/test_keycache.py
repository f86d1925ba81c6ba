"""The live keys each API process holds in memory: loaded at start, following creations and
revocations as they commit, and never holding a key read as live before a revocation whose
notification was already handled (or the revoked key would keep working until the next
reload)."""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.api import appkeys, keycache
from service.api.app import create_app
from service.api.keycache import KeyCache
from service.domain.errors import Unauthenticated
from service.domain.keys import LiveKey, Principal, hash_secret
from service.store import auth
from tests.eventkit import wait_until
from tests.factories import Org

# How long a notification may take to reach the listener before the test gives up (a bound
# on a wait, never a sleep).
NOTIFY_TIMEOUT = 10
TURNS = 100


async def _authenticate(pool: asyncpg.Pool, client_key: str, secret: str) -> Principal:
    async with pool.acquire() as conn:
        return await auth.authenticate(conn, client_key, secret)


async def test_a_lookup_older_than_a_handled_revocation_is_not_cached(settings, pool: asyncpg.Pool, org: Org) -> None:
    cache = KeyCache(reload_seconds=30)
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


async def test_every_live_key_is_held_from_the_start_and_new_ones_as_they_commit(
    settings, pool: asyncpg.Pool, org: Org
) -> None:
    cache = KeyCache(reload_seconds=30)
    async with keycache.listening(cache, settings.database_url, settings.db_connect_timeout):
        client_key, _, secret = org.read_key.partition(".")

        async def loaded() -> bool:
            return cache.get(client_key, secret) is not None

        await wait_until(loaded, timeout=NOTIFY_TIMEOUT, what="the live keys to be loaded")
        principal = cache.get(client_key, secret)
        assert principal is not None and principal.organization_id == org.id and principal.scopes == {"read"}
        # A wrong secret for a held key is known to be wrong without asking the database.
        assert cache.holds(client_key) and cache.get(client_key, "not-the-secret") is None

        async with pool.acquire() as conn:
            new = await auth.create_key(conn, org.name, ("read", "write"), environment="test")

        async def heard() -> bool:
            return cache.get(new.client_key, new.client_secret) is not None

        await wait_until(heard, timeout=NOTIFY_TIMEOUT, what="a created key to be held")
        held = cache.get(new.client_key, new.client_secret)
        assert held is not None and held.environment == "test"

        heard_revocations = cache.notifications
        async with pool.acquire() as conn:
            await auth.revoke_key(conn, new.client_key)
        await asyncio.wait_for(cache.notified(heard_revocations + 1), NOTIFY_TIMEOUT)
        assert not cache.holds(new.client_key)


def test_a_reload_read_before_a_handled_revocation_is_not_held() -> None:
    cache = KeyCache(reload_seconds=30)
    cache.listening = True
    principal = Principal(uuid.uuid4(), "acme", "tly_000000000001", frozenset({"read"}), "prod")
    generation = cache.generation
    cache.revoked("tly_000000000001")  # handled while the reload was reading
    assert not cache.replace({"tly_000000000001": LiveKey(hash_secret("s"), principal)}, generation)
    assert not cache.holds("tly_000000000001")
    assert cache.replace({"tly_000000000001": LiveKey(hash_secret("s"), principal)}, cache.generation)
    assert cache.get("tly_000000000001", "s") == principal


def test_a_disabled_store_holds_nothing() -> None:
    cache = KeyCache(reload_seconds=0)
    cache.listening = True
    principal = Principal(uuid.uuid4(), "acme", "tly_000000000002", frozenset({"read"}), "prod")
    cache.put("tly_000000000002", "s", principal, cache.generation)
    assert cache.get("tly_000000000002", "s") is None and not cache.holds("tly_000000000002")
