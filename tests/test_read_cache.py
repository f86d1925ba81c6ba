"""Conditional and cached reads (service/api/readcache.py): every list and retrieve has an
ETag, If-None-Match answers 304, and a response served from memory is never one a commit the
process has heard of could have changed — a fold's, a PATCH's, a DELETE's, on this process or
another — while a revoked key gets nothing from the cache. The cache's own rules (versions,
epochs, expiry, its size bound) are unit-tested with a clock of their own."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import defaultdict
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request

from service.api import appkeys, readcache
from service.api.changewatch import ChangeWatch, Scope
from service.api.readcache import CACHE_CONTROL, Entry, ReadCache, etag, matches
from service.infra.settings import Settings
from service.store import auth
from service.store.changelog import Position
from tests.eventkit import Broker, cloud_event, fold_events, usage, wait_until
from tests.factories import Org, insert_customer
from tests.processes import TallyProcess
from tests.support import ok_json, problem, uid

SCOPE = (uuid.UUID(int=1), "prod")


# ---- the cache's rules ----------------------------------------------------------------------


def entry(version: tuple[int, int], body: bytes = b"{}", expires: float = 1e12) -> Entry:
    return Entry(version, body, "application/json", etag(body), (), expires)


def test_an_entry_holds_only_for_its_version() -> None:
    cache = ReadCache(1000, 1000, clock=lambda: 0.0)
    cache.put(SCOPE, "GET /a", entry((0, 3)))
    assert cache.get(SCOPE, "GET /a", (0, 3)) is not None
    assert cache.get(SCOPE, "GET /a", (0, 4)) is None  # a change heard since
    assert cache.get(SCOPE, "GET /a", (0, 3)) is None  # and it is gone
    cache.put(SCOPE, "GET /a", entry((0, 4)))
    assert cache.get(SCOPE, "GET /a", (1, 4)) is None  # a new epoch: the listener reconnected


def test_entries_expire_at_the_next_quarter_hour() -> None:
    now = [1_000.0]
    cache = ReadCache(1000, 1000, clock=lambda: now[0])
    assert cache.expiry() == 1_800.0
    cache.put(SCOPE, "GET /a", entry((0, 0), expires=cache.expiry()))
    now[0] = 1_799.0
    assert cache.get(SCOPE, "GET /a", (0, 0)) is not None
    now[0] = 1_800.0
    assert cache.get(SCOPE, "GET /a", (0, 0)) is None


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = ReadCache(300, 150, clock=lambda: 0.0)
    assert not cache.put(SCOPE, "big", entry((0, 0), b"x" * 200))  # over the entry bound
    for name in ("a", "b", "c"):
        assert cache.put(SCOPE, name, entry((0, 0), b"y" * 90))
    cache.get(SCOPE, "a", (0, 0))  # a is now the most recently used
    cache.put(SCOPE, "d", entry((0, 0), b"z" * 90))
    assert cache.bytes <= 300
    assert cache.get(SCOPE, "b", (0, 0)) is None
    assert cache.get(SCOPE, "a", (0, 0)) is not None


def test_a_zero_size_cache_keeps_nothing() -> None:
    cache = ReadCache(0, 1000)
    assert not cache.enabled and not cache.put(SCOPE, "a", entry((0, 0)))


def test_if_none_match_compares_weakly_and_takes_lists() -> None:
    tag = etag(b"body")
    assert matches(tag, tag) and matches(f'"other", W/{tag}', tag) and matches("*", tag)
    assert not matches(None, tag) and not matches('"other"', tag) and not matches("", tag)


def test_versions_follow_what_the_watch_hears() -> None:
    watch = ChangeWatch()
    assert watch.version(SCOPE) is None  # not listening: nothing can be known
    watch.listening = True
    watch.restart()
    first = watch.version(SCOPE)
    assert watch.bump(SCOPE) == 1 and watch.version(SCOPE) != first
    other = (uuid.UUID(int=2), "prod")
    assert watch.version(other) == (watch.epoch, 0)


# ---- reads that miss together ---------------------------------------------------------------


class Reads:
    """A read that counts its calls, each answering only when let go (``let_go(n)`` for the
    n-th call, ``let_all_go()`` for every one), as a statement does when it finishes: with
    ``outcomes[n]`` if given (a status, or an exception to raise), else 200, ``body`` and a
    ``Tally-As-Of`` header."""

    def __init__(self, body: bytes = b'{"n":1}', outcomes: dict[int, int | Exception] | None = None) -> None:
        self.calls = 0
        self.body, self.outcomes = body, outcomes or {}
        self._gates: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self._open = False

    def let_go(self, *calls: int) -> None:
        for n in calls:
            self._gates[n].set()

    def let_all_go(self) -> None:
        self._open = True
        for gate in self._gates.values():
            gate.set()

    async def __call__(self) -> web.StreamResponse:
        self.calls += 1
        n = self.calls
        if not self._open:
            await self._gates[n].wait()
        outcome = self.outcomes.get(n, 200)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome != 200:
            return web.json_response({"status": outcome}, status=outcome)
        return web.Response(body=self.body, content_type="application/json", headers={"Tally-As-Of": str(n)})


def listening() -> ChangeWatch:
    watch = ChangeWatch()
    watch.listening = True
    watch.restart()
    return watch


def ask(
    cache: ReadCache,
    watch: ChangeWatch,
    read: Reads,
    key: str = "GET /v1/customers",
    storable: bool = True,
    scope: Scope = SCOPE,
    bypass: bool = False,
    **headers: str,
) -> asyncio.Task[web.StreamResponse]:
    request = make_mocked_request("GET", "/v1/customers", headers=headers)
    return asyncio.create_task(
        readcache.conditional(request, scope, key, cache, watch, read, bypass=bypass, storable=lambda _: storable)
    )


async def reading(read: Reads, calls: int) -> None:
    async def there() -> bool:
        return read.calls == calls

    await wait_until(there, what=f"{calls} reads under way")


async def under_way(cache: ReadCache, watch: ChangeWatch, key: str = "GET /v1/customers") -> None:
    async def begun() -> bool:
        return cache.reading(SCOPE, key, watch.version(SCOPE)) is not None

    await wait_until(begun, what="the first read to begin")


async def test_reads_of_one_response_that_miss_together_make_one_read() -> None:
    cache, watch, read = ReadCache(10_000, 10_000), listening(), Reads()
    first = ask(cache, watch, read)
    await under_way(cache, watch)
    others = [ask(cache, watch, read) for _ in range(4)]
    conditional_one = ask(cache, watch, read, **{"If-None-Match": etag(read.body)})
    another_view = ask(cache, watch, read, key="GET /v1/customers?limit=1")
    await asyncio.sleep(0)  # every request reaches its wait before the read answers
    read.let_all_go()
    answers = await asyncio.gather(first, *others)
    assert read.calls == 2  # the first read, and the other view's own
    assert {a.status for a in answers} == {200} and {a.body for a in answers} == {read.body}  # type: ignore[attr-defined]
    assert len({a.headers["ETag"] for a in answers}) == 1
    assert (await conditional_one).status == 304
    assert (await another_view).status == 200
    assert cache.reading(SCOPE, "GET /v1/customers", watch.version(SCOPE)) is None


async def test_a_read_that_is_not_kept_is_still_shared_with_those_waiting_for_it() -> None:
    """A standby's read is not kept (no version says how new it is), but the requests that
    missed with it would have read the standby too: they share it, and the cache stays empty."""
    cache, watch, read = ReadCache(10_000, 10_000), listening(), Reads()
    first = ask(cache, watch, read, storable=False)
    await under_way(cache, watch)
    others = [ask(cache, watch, read, storable=False) for _ in range(3)]
    await asyncio.sleep(0)
    read.let_all_go()
    assert [a.status for a in await asyncio.gather(first, *others)] == [200] * 4
    assert read.calls == 1 and len(cache) == 0


async def test_a_request_after_a_commit_is_heard_does_not_wait_for_an_older_read() -> None:
    cache, watch, read = ReadCache(10_000, 10_000), listening(), Reads()
    first = ask(cache, watch, read)
    await under_way(cache, watch)
    watch.bump(SCOPE)  # a commit heard while the first read is under way: it may not show it
    second = ask(cache, watch, read)

    async def both_reading() -> bool:
        return read.calls == 2

    await wait_until(both_reading, what="the second request to read for itself")
    read.let_all_go()
    await asyncio.gather(first, second)


@pytest.mark.parametrize("failure", ["an error response", "an exception", "a cancelled request"])
async def test_when_the_read_others_wait_for_fails_the_first_of_them_reads_for_the_rest(failure: str) -> None:
    outcomes: dict[int, int | Exception] = {
        "an error response": {1: 503},
        "an exception": {1: RuntimeError("the read failed")},
        "a cancelled request": {},
    }[failure]
    cache, watch, read = ReadCache(10_000, 10_000), listening(), Reads(outcomes=outcomes)
    first = ask(cache, watch, read)
    await under_way(cache, watch)
    waiting = [ask(cache, watch, read) for _ in range(3)]
    await asyncio.sleep(0)
    if failure == "a cancelled request":
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    else:
        read.let_go(1)
        if failure == "an error response":
            assert (await first).status == 503
        else:
            with pytest.raises(RuntimeError):
                await first
    await reading(read, 2)  # one waiter reads; the others wait for it rather than all reading at once
    read.let_go(2)
    answers = await asyncio.gather(*waiting)
    assert [a.status for a in answers] == [200] * 3 and read.calls == 2
    assert cache.reading(SCOPE, "GET /v1/customers", watch.version(SCOPE)) is None


async def test_a_read_that_keeps_failing_is_waited_for_twice_at_most() -> None:
    cache, watch = ReadCache(10_000, 10_000), listening()
    read = Reads(outcomes={1: 503, 2: 503})
    first = ask(cache, watch, read)
    await under_way(cache, watch)
    waiting = [ask(cache, watch, read) for _ in range(3)]
    await asyncio.sleep(0)
    read.let_go(1)
    await reading(read, 2)
    read.let_go(2)
    # The first waiter's own read failed too: the next leads again, and the last, having
    # waited twice, reads for itself.
    await reading(read, 4)
    read.let_all_go()
    assert (await first).status == 503 and [(await w).status for w in waiting] == [503, 200, 200]


async def test_a_read_shared_past_its_quarter_hour_is_read_again() -> None:
    """A budget period turns at a zone's midnight (a quarter hour): an answer read before it is
    not handed to a request that waited past it."""
    now = [1_000.0]
    cache, watch, read = ReadCache(10_000, 10_000, clock=lambda: now[0]), listening(), Reads()
    first = ask(cache, watch, read)
    await under_way(cache, watch)
    waiting = [ask(cache, watch, read) for _ in range(2)]
    await asyncio.sleep(0)
    now[0] = 1_800.0  # the first read began before 1,800 and ends after it
    read.let_go(1)
    await first
    await reading(read, 2)
    read.let_go(2)
    assert [(await w).headers["Tally-As-Of"] for w in waiting] == ["2", "2"]


async def test_waiters_get_the_reads_headers_and_only_their_own_scope_and_bypass_never_waits() -> None:
    cache, watch, read = ReadCache(10_000, 10_000), listening(), Reads()
    other_scope = (uuid.UUID(int=2), "prod")
    assert watch.version(other_scope) == watch.version(SCOPE)  # only the scope tells them apart
    first = ask(cache, watch, read)
    await under_way(cache, watch)
    same = ask(cache, watch, read)
    other = ask(cache, watch, read, scope=other_scope)
    token = ask(cache, watch, read, bypass=True)
    await reading(read, 3)  # the other organization's and the token's requests read for themselves
    read.let_all_go()
    first_answer, same_answer = await first, await same
    assert same_answer.headers["Tally-As-Of"] == first_answer.headers["Tally-As-Of"] == "1"
    assert same_answer.headers["ETag"] == first_answer.headers["ETag"]
    assert same_answer.headers["Cache-Control"] == CACHE_CONTROL
    assert (await other).headers["Tally-As-Of"] != "1" and (await token).headers["Tally-As-Of"] != "1"
    assert read.calls == 3


async def test_a_waiting_request_cancelled_leaves_the_read_to_the_others() -> None:
    cache, watch, read = ReadCache(10_000, 10_000), listening(), Reads()
    first = ask(cache, watch, read)
    await under_way(cache, watch)
    leaving, staying = ask(cache, watch, read), ask(cache, watch, read)
    await asyncio.sleep(0)
    leaving.cancel()
    read.let_all_go()
    assert (await first).status == 200 and (await staying).status == 200
    assert leaving.cancelled() and read.calls == 1


# ---- in one API process ---------------------------------------------------------------------


async def get(client: TestClient, url: str, org: Org, **headers: str) -> aiohttp.ClientResponse:
    return await client.get(url, headers={**org.headers(), **headers})


async def heard(client: TestClient, org: Org, before: tuple[int, int] | None) -> None:
    watch = client.server.app[appkeys.CHANGE_WATCH]

    async def changed() -> bool:
        return watch.version((org.id, "prod")) != before

    await wait_until(changed, what="the API to hear of the commit")


@pytest.mark.parametrize("url", ["/v1/customers", "/v1/customers/{ident}", "/compat/respan/api/users/list/"])
async def test_reads_carry_an_etag_and_answer_304(client: TestClient, pool: asyncpg.Pool, org: Org, url: str) -> None:
    ident = uid()
    await insert_customer(pool, org, ident)
    url = url.format(ident=ident)
    first = await get(client, url, org)
    await ok_json(first)
    tag = first.headers["ETag"]
    assert first.headers["Cache-Control"] == CACHE_CONTROL
    Position.parse(first.headers["Tally-As-Of"])
    again = await get(client, url, org, **{"If-None-Match": tag})
    assert again.status == 304 and again.headers["ETag"] == tag and await again.read() == b""
    other = await get(client, url, org, **{"If-None-Match": '"stale"'})
    assert other.status == 200 and other.headers["ETag"] == tag


async def test_a_lists_etag_does_not_depend_on_its_as_of(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    """A list's as_of moves with every transaction on the server (any database's); its ETag
    follows the data only, so the same page read at another horizon has the same tag."""
    await insert_customer(pool, org, uid())
    first = await get(client, "/v1/customers", org)
    body, tag = await first.read(), first.headers["ETag"]
    as_of = orjson.dumps({"as_of": orjson.loads(body)["as_of"]})[1:-1]
    later = b'"as_of":"99999999.0"'
    assert as_of in body and as_of != later
    assert etag(body.replace(as_of, later), later) == tag
    assert etag(body.replace(b'"count":1', b'"count":2'), as_of) != tag


async def test_a_fold_commit_is_never_answered_from_memory_after_it_is_heard(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    ident = uid()
    async with pool.acquire() as conn:
        await fold_events(conn, usage(org.name, ident, cost="1"))
    url = f"/v1/customers/{ident}"
    body = await ok_json(await get(client, url, org))
    tag = (await get(client, url, org)).headers["ETag"]
    cache = client.server.app[appkeys.READ_CACHE]
    assert len(cache) >= 1
    before = client.server.app[appkeys.CHANGE_WATCH].version((org.id, "prod"))
    async with pool.acquire() as conn:
        await fold_events(conn, usage(org.name, ident, cost="2"))
    await heard(client, org, before)
    fresh = await get(client, url, org, **{"If-None-Match": tag})
    assert fresh.status == 200 and fresh.headers["ETag"] != tag
    assert (await fresh.json())["total_cost"] != body["total_cost"]


async def test_this_process_reads_its_own_writes_at_once(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid()
    await ok_json(await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers()), 201)
    url = f"/v1/customers/{ident}"
    await ok_json(await get(client, url, org))
    listed = await ok_json(await get(client, "/v1/customers", org))
    # No waiting for the notification: the write bumped the version before it answered.
    await ok_json(await client.patch(url, json={"name": "renamed"}, headers=org.headers()))
    assert (await ok_json(await get(client, url, org)))["name"] == "renamed"
    assert (await client.delete(url, headers=org.headers())).status == 204
    await problem(await get(client, url, org), 404)
    after = await ok_json(await get(client, "/v1/customers", org))
    assert after["count"] == listed["count"] - 1


async def test_a_revoked_key_gets_nothing_from_the_cache(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    async with pool.acquire() as conn:
        key = (await auth.create_key(conn, org.name, ("read",))).key
    headers = {"Authorization": f"Bearer {key}"}
    await ok_json(await client.get("/v1/customers", headers=headers))
    await ok_json(await client.get("/v1/customers", headers=headers))  # now from memory
    async with pool.acquire() as conn:
        await auth.revoke_key(conn, key)

    async def refused() -> bool:
        return (await client.get("/v1/customers", headers=headers)).status == 401

    await wait_until(refused, what="the revoked key to be refused")


# ---- across API processes -------------------------------------------------------------------


def hits(metrics_text: str) -> float:
    match = re.search(r'^tally_read_cache_total\{outcome="hit"\} ([0-9.e+]+)$', metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_two_api_processes_never_serve_a_write_from_memory_once_told(
    settings: Settings, migrated: str, pool: asyncpg.Pool, org: Org, broker: Broker, tmp_path: Path
) -> None:
    ident = uid()
    await insert_customer(pool, org, ident, name="before")
    env = {"TALLY_SHED_DELAY": "0", "TALLY_IP_RATE_LIMIT_BURST": "100000"}
    apis = [TallyProcess(f"api{i}", settings, broker, tmp_path, env, command="api") for i in range(2)]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for api in apis:
                await api.wait_ready(session)
            writer, reader = apis
            url = f"{reader.url}/v1/customers/{ident}"

            async def read(**headers: str) -> aiohttp.ClientResponse:
                async with session.get(url, headers={**org.headers(), **headers}) as r:
                    await r.read()
                    return r

            async def name(**headers: str) -> str:
                async with session.get(url, headers={**org.headers(), **headers}) as r:
                    return (await r.json())["name"]

            assert await name() == "before"
            async with session.get(f"{reader.url}/metrics") as r:
                hits_before = hits(await r.text())
            assert await name() == "before"
            async with session.get(f"{reader.url}/metrics") as r:
                assert hits(await r.text()) == hits_before + 1  # served from memory
            # A write through the other process: with its consistency token, the reader answers
            # it at once (the token bypasses the cache); without, as soon as it has heard.
            async with session.patch(
                f"{writer.url}/v1/customers/{ident}", json={"name": "after"}, headers=org.headers()
            ) as r:
                assert r.status == 200, await r.text()
                token = r.headers["X-Tally-Consistency"]
            assert await name(**{"X-Tally-Consistency": token}) == "after"

            async def renamed() -> bool:
                return await name() == "after"

            await wait_until(renamed, what="the reader to hear of the write")
            for _ in range(5):  # and never the old one again
                assert await name() == "after"
            # A deletion by a fold (the consumer's path) reaches the reader the same way.
            async with pool.acquire() as conn:
                await fold_events(conn, cloud_event(org.name, ident, "customer.deleted", {}))

            async def gone() -> bool:
                return (await read()).status == 404

            await wait_until(gone, what="the reader to hear of the deletion")
    finally:
        for api in apis:
            await api.terminate()
            api.close()
