"""Fair sharing between organizations. The database: one tenant's slow requests never queue
another's without end (requests whose database work we hold still — a PATCH waiting on a
customer row a test connection has locked — stand in for 32 slow lists). The work itself: each
request's event-loop CPU and database time is charged to its organization's share, and an
organization past its share is shed (429, after a delay) while others are active, served while
it is alone. Bodies are bounded per route before they are read. Outcomes are asserted, never
durations; the share's clock is the test's."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.api import appkeys, routing
from service.api.app import create_app
from service.api.fairness import REQUEST_OVERHEAD, CostMeter, OrgShares, Replicas, metered
from service.api.ratelimit import RateLimiter
from service.infra.settings import Settings
from service.web.app import base_app
from tests.eventkit import usage, wait_until
from tests.factories import Org, insert_customer
from tests.support import ok_json, problem, uid

LOCK_ROW = (
    "SELECT 1 FROM customers WHERE organization_id = $1 AND customer_identifier = $2 AND environment = 'prod'"
    " FOR UPDATE"
)
LOCK_WAITERS = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    " AND pid <> pg_backend_pid()"
)


@asynccontextmanager
async def row_locked(pool: asyncpg.Pool, org: Org, identifier: str) -> AsyncIterator[None]:
    """Hold ``identifier``'s row lock (as a long fold would) until the block exits."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(LOCK_ROW, org.id, identifier)
        yield


async def lock_waiters_reach(pool: asyncpg.Pool, count: int) -> None:
    async def waiting() -> bool:
        return await pool.fetchval(LOCK_WAITERS) >= count

    await wait_until(waiting, timeout=10, what=f"{count} request(s) waiting on a row lock")


async def no_lock_waiters(pool: asyncpg.Pool) -> None:
    async def none() -> bool:
        return await pool.fetchval(LOCK_WAITERS) == 0

    await wait_until(none, timeout=10, what="no statement left waiting on a row lock")


def patch_name(client: TestClient, org: Org, identifier: str) -> asyncio.Future:
    return asyncio.ensure_future(
        client.patch(f"/v1/customers/{identifier}", json={"name": uid("n")}, headers=org.headers())
    )


async def test_a_busy_organization_is_shed_and_others_are_served(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    fair = settings.model_copy(update={"db_pool_max": 4, "db_org_concurrency": 1, "db_acquire_timeout": 0.5})
    a_customer = uid("a")
    await insert_customer(pool, org, a_customer)
    b_customer = uid("b")
    await insert_customer(pool, other_org, b_customer)
    async with TestClient(TestServer(create_app(fair))) as client:
        async with row_locked(pool, org, a_customer):
            # A's one database turn is taken by a request stuck in PostgreSQL.
            held = patch_name(client, org, a_customer)
            await lock_waiters_reach(pool, 1)

            # Another organization is served as if A were idle ...
            body = await ok_json(await client.get(f"/v1/customers/{b_customer}", headers=other_org.headers()))
            assert body["customer_identifier"] == b_customer
            await ok_json(await client.get("/v1/customers", headers=other_org.headers()))

            # ... while A's further requests are shed, not queued.
            for path in ("/v1/customers", f"/v1/customers/{a_customer}"):
                resp = await client.get(path, headers=org.headers())
                body = await problem(resp, 503)
                assert int(resp.headers["Retry-After"]) >= 1
                assert "organization" in body["detail"]
        assert (await held).status == 200
        # A's turn is back once its work finished.
        await ok_json(await client.get(f"/v1/customers/{a_customer}", headers=org.headers()))


async def test_waiting_for_a_pool_connection_is_bounded(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    """Every pooled connection is held by slow work: a request gets a 503 with Retry-After
    after TALLY_DB_ACQUIRE_TIMEOUT, rather than waiting without end."""
    tiny = settings.model_copy(
        update={"db_pool_min": 1, "db_pool_max": 2, "db_org_concurrency": 2, "db_acquire_timeout": 0.5}
    )
    first, second = uid("a"), uid("a")
    for identifier in (first, second):
        await insert_customer(pool, org, identifier)
    async with TestClient(TestServer(create_app(tiny))) as client:
        # The other organization's key is verified (and cached) while the pool is free.
        await ok_json(await client.get("/v1/customers", headers=other_org.headers()))
        async with row_locked(pool, org, first), row_locked(pool, org, second):
            held = [patch_name(client, org, first), patch_name(client, org, second)]
            await lock_waiters_reach(pool, 2)
            # A page not read before: one read already is answered from memory, without a connection.
            resp = await client.get("/v1/customers?limit=7", headers=other_org.headers())
            body = await problem(resp, 503)
            assert int(resp.headers["Retry-After"]) >= 1
            assert "connection" in body["detail"]
        assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
        await ok_json(await client.get("/v1/customers", headers=other_org.headers()))


async def test_the_api_pool_stops_statements_in_postgresql(
    settings: Settings, migrated, pool: asyncpg.Pool, org: Org
) -> None:
    """TALLY_DB_COMMAND_TIMEOUT is also the API sessions' statement_timeout, so a statement
    the client gave up on does not keep a backend busy; such a request is a 503, never a 500.
    A consumer's pool (base_app without a statement timeout) is left as it was."""
    quick = settings.model_copy(update={"db_command_timeout": 1.0})
    identifier = uid("a")
    await insert_customer(pool, org, identifier)
    app = create_app(quick)
    async with TestClient(TestServer(app)) as client:
        assert await app[appkeys.POOL].fetchval("SHOW statement_timeout") == "1s"
        async with row_locked(pool, org, identifier):
            resp = await patch_name(client, org, identifier)
            await problem(resp, 503)
            assert resp.headers["Retry-After"]
            await no_lock_waiters(pool)  # the backend stopped: nothing is left behind while the lock is held
    consumer_like = base_app(quick)
    async with TestClient(TestServer(consumer_like)):
        assert await consumer_like[appkeys.POOL].fetchval("SHOW statement_timeout") == "0"


# ---- cost shares --------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_share_is_charged_up_front_and_settled_with_what_was_used() -> None:
    clock = Clock()
    a, b = uuid.uuid4(), uuid.uuid4()
    shares = OrgShares(rate=1.0, burst=2.0, replicas=Replicas(), concurrency=8, clock=clock)
    first = shares.admit(a)
    assert first.admitted and first.charged == REQUEST_OVERHEAD
    shares.settle(a, first, 1.5)  # the request cost 1.5 s
    assert shares.tokens(a) == pytest.approx(0.5)
    # Its average cost moved towards 1.5 s: the next admission is charged that up front.
    second = shares.admit(a)
    assert second.admitted and second.charged > 0.2
    shares.settle(a, second, 1.0)
    # Past its share while alone: still admitted (nobody waits for what it uses) ...
    assert shares.tokens(a) < 0
    assert shares.admit(a).admitted
    # ... but not while another organization is active, and told when to come back.
    assert shares.admit(b).admitted
    refused = shares.admit(a)
    assert not refused.admitted and refused.retry_after >= 1
    # Refills at the share's rate; an organization's debt is bounded by one burst.
    clock.now += refused.retry_after + 0.5
    assert shares.admit(b).admitted and shares.admit(a).admitted


def test_a_request_is_charged_what_its_kind_is_expected_to_cost() -> None:
    """The first expensive request of an organization on a route is charged what that route's
    requests cost others: a burst of them cannot all start before any of them is paid for."""
    clock = Clock()
    heavy, light, newcomer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    shares = OrgShares(rate=0.1, burst=1.0, replicas=Replicas(), concurrency=8, clock=clock)

    def cheap() -> bool:
        admission = shares.admit(light, "/cheap")
        shares.settle(light, admission, 0.001)
        return admission.admitted

    assert cheap()
    shares.settle(heavy, shares.admit(heavy, "/costly"), 0.9)
    clock.now += 60  # the heavy organization's bucket is full again
    # Its next costly request is charged ~0.9 s up front: the bucket holds one at a time.
    first = shares.admit(heavy, "/costly")
    assert first.admitted and first.charged == pytest.approx(0.9)
    assert cheap()
    assert not shares.admit(heavy, "/costly").admitted
    # A newcomer's first costly request is charged what that route costs others, not nothing;
    # and until one of its requests there has ended, they run one at a time.
    assert shares.admit(newcomer, "/costly").charged == pytest.approx(0.9)
    assert not shares.admit(newcomer, "/costly").admitted
    # Cheap requests of the light organization are never held back by the heavy ones.
    assert all(cheap() for _ in range(5))


def test_shares_are_divided_between_live_replicas() -> None:
    clock = Clock()
    replicas = Replicas()
    replicas.count = 4
    shares = OrgShares(rate=1.0, burst=2.0, replicas=replicas, concurrency=8, clock=clock)
    org = uuid.uuid4()
    assert shares.tokens(org) == pytest.approx(0.5)  # this process's quarter of the burst
    limiter = RateLimiter(rate=8, burst=8, replicas=replicas)
    assert [limiter.take("k", now=5.0).allowed for _ in range(3)] == [True, True, False]


async def test_the_meter_counts_loop_time_not_waiting() -> None:
    async def work() -> str:
        started = time.thread_time()
        while time.thread_time() - started < 0.02:  # 20 ms of CPU on the loop
            pass
        await asyncio.sleep(0.2)  # waiting costs nobody anything
        return "done"

    meter = CostMeter()
    assert await metered(work(), meter) == "done"
    assert 0.02 <= meter.cpu < 0.1


async def test_an_organization_past_its_share_is_shed_while_others_are_active(
    settings: Settings, migrated, org: Org, other_org: Org
) -> None:
    tight = settings.model_copy(update={"org_share_seconds": 1.0, "shed_delay": 0.05, "api_heartbeat_seconds": 0})
    app = create_app(tight)
    clock = Clock()
    # The app's own shares, on a clock the test moves: no refill unless the test says so.
    app[routing.SHARES] = shares = OrgShares(rate=0.001, burst=10.0, replicas=Replicas(), concurrency=8, clock=clock)
    async with TestClient(TestServer(app)) as client:
        await ok_json(await client.get("/v1/customers", headers=other_org.headers()))  # B is active
        # A has used more than its share (as a request costing 20 s of work would) ...
        await ok_json(await client.get("/v1/customers", headers=org.headers()))
        shares.settle(org.id, shares.admit(org.id), 20.0)
        assert shares.tokens(org.id) < 0
        # ... so while B is active, A is shed — after the shed delay — and B is served.
        pending = asyncio.ensure_future(client.get("/v1/customers", headers=org.headers()))

        async def held() -> bool:
            return app[routing.TARPIT].holding == 1

        await wait_until(held, timeout=5, what="the shed request to be held")
        resp = await pending
        body = await problem(resp, 429)
        assert int(resp.headers["Retry-After"]) >= 1 and "share" in body["detail"]
        await ok_json(await client.get("/v1/customers", headers=other_org.headers()))
        # A alone (B idle past the activity window) is served again, whatever it owes.
        clock.now += 2
        await ok_json(await client.get("/v1/customers", headers=org.headers()))
        assert shares.tokens(org.id) < 0


async def test_refused_bodies_are_charged_to_their_organization(settings: Settings, migrated, org: Org) -> None:
    """A 1,000-event body whose last event is bad is refused with a 400, and the work of
    reading and validating it is charged to the organization that sent it."""
    app = create_app(settings.model_copy(update={"org_share_seconds": 1.0, "api_heartbeat_seconds": 0}))
    events = [usage(org.name, f"s{i}") for i in range(1000)]
    events[-1]["data"]["requests"] = -1
    async with TestClient(TestServer(app)) as client:
        shares = app[routing.SHARES]
        before = shares.tokens(org.id)
        await problem(await client.post("/v1/events", json=events, headers=org.headers()), 400, "[999].data.requests")
        assert before - shares.tokens(org.id) > 10 * REQUEST_OVERHEAD


async def test_a_body_over_its_routes_bound_is_refused_before_it_is_read(client: TestClient, org: Org) -> None:
    big = {"filters": {"customer_identifier": {"value": ["x" * 200] * 400}}}  # ~82 KB
    for path in ("/compat/respan/api/users/list/", "/compat/flexprice/v1/customers/search"):
        resp = await client.post(
            path, json=big if "respan" in path else {"external_ids": ["x" * 200] * 400}, headers=org.headers()
        )
        body = await problem(resp, 413)
        assert "65536" in body["detail"] and resp.headers.get("Connection", "").lower() == "close"
    resp = await client.post(
        "/v1/customers", json={"customer_identifier": uid(), "metadata": {"a": "x" * 70_000}}, headers=org.headers()
    )
    await problem(resp, 413)
