"""Signed outbound webhooks, against a real receiver (an aiohttp server on 127.0.0.1), the real
database and, for the restart, real `tally consume` processes: the routes (admin scope, the
secret shown once, other organizations' endpoints invisible, bounds), deliveries of customer
changes and budget alerts signed so that Stripe's own verifier accepts them, order per
customer across a receiver outage, restarts, two dispatchers at once, the address rules at
creation and at send time, redirects, long answers, and disabling after continuous failure.

Dispatchers in this module take an injected clock (``Clock``) and are driven a turn at a time
(``Dispatcher.step``): retries come due by moving the clock, not by waiting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import orjson
import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from consumers.webhooks import YIELD_MATERIALIZE_GAP, Dispatcher
from service.api.app import create_app
from service.api.webhooks import MAX_ENDPOINTS, webhook_shape
from service.domain.webhooks import SIGNATURE_HEADER, new_secret
from service.infra import metrics
from service.infra.settings import Settings
from service.store import alerts as alerts_store
from service.store import auth
from service.store import webhooks as store
from service.store.changefeed import Cursor, read_feed
from service.store.changelog import Position
from tests.eventkit import cloud_event, fold_events, usage, wait_until
from tests.factories import Org
from tests.processes import Fleet
from tests.support import ok_json, problem, uid

ALL_EVENTS = ["customer.created", "customer.updated", "customer.deleted", "alert.budget"]


# ---- a receiver --------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    body: bytes
    headers: dict[str, str]

    @property
    def event(self) -> dict[str, Any]:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """Records every POST; answers ``answer(request number)`` (200 by default). ``/redirect``
    answers 302 to ``/target``; ``/huge`` streams an endless body; ``/slow`` holds each
    request ``slow`` seconds, counting how many overlap per event id."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    answer: Callable[[int], int] = lambda n: 200
    slow: float = 0.0
    in_flight: dict[str, int] = field(default_factory=dict)
    overlaps: int = 0
    huge_written: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path, body, dict(request.headers)))
        if request.path == "/redirect":
            return web.Response(status=302, headers={"Location": "/target"})
        if request.path == "/huge":
            response = web.StreamResponse()
            await response.prepare(request)
            chunk = b"x" * 65_536
            with contextlib.suppress(ConnectionError):
                for _ in range(1024):  # 64 MB, unless the client stops reading
                    await response.write(chunk)
                    self.huge_written += len(chunk)
            return response
        if self.slow:
            event_id = orjson.loads(body)["id"]
            self.in_flight[event_id] = self.in_flight.get(event_id, 0) + 1
            if self.in_flight[event_id] > 1:
                self.overlaps += 1
            await asyncio.sleep(self.slow)  # the receiver's own work, overlapping attempts would show
            self.in_flight[event_id] -= 1
        return web.Response(status=self.answer(len(self.received)))

    def events(self, path: str = "/hook") -> list[dict[str, Any]]:
        return [r.event for r in self.received if r.path == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", r.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    r.url = f"http://127.0.0.1:{port}"
    yield r
    await runner.cleanup()


# ---- tally's side ------------------------------------------------------------------------------


class Clock:
    """The time, moved ahead by :meth:`advance` (an API write stamps its rows with the real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class FrozenClock(Clock):
    """The time the clock was made, moved only by :meth:`advance`."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.time()

    def __call__(self) -> float:
        return self.start + self.offset


@pytest.fixture(scope="module")
def private_settings(settings: Settings) -> Settings:
    """The suite's settings, with webhooks allowed to reach 127.0.0.1 (where the receiver is)."""
    return settings.model_copy(update={"webhook_allow_private": True, "webhook_timeout_seconds": 5.0})


@pytest.fixture(scope="module")
async def private_client(migrated: str, private_settings: Settings) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(private_settings))) as c:
        yield c


Make = Callable[..., Dispatcher]


@pytest.fixture
async def dispatcher(pool: asyncpg.Pool) -> AsyncIterator[Make]:
    """Makes dispatchers on the suite's pool (``settings``, then an optional Clock), closed afterwards."""
    made: list[Dispatcher] = []

    def make(settings: Settings, clock: Clock | None = None) -> Dispatcher:
        made.append(Dispatcher(settings, pool, webhook_shape(), clock=clock or Clock(), jitter=lambda: 0.0))
        return made[-1]

    yield make
    for d in made:
        await d.close()


async def admin_headers(pool: asyncpg.Pool, org: Org, environment: str = "prod") -> dict[str, str]:
    async with pool.acquire() as conn:
        key = await auth.create_key(conn, org.name, ("admin",), environment=environment)
    return {"Authorization": f"Bearer {key.key}"}


async def subscribe(client: TestClient, headers: dict[str, str], url: str, events: list[str] = ALL_EVENTS) -> dict:
    return await ok_json(await client.post("/v1/webhooks", json={"url": url, "events": events}, headers=headers), 201)


async def steps_until(d: Dispatcher, condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Turn the dispatcher until ``condition`` holds (a commit is materialised once it is
    below every reader's horizon, which another transaction may hold back for a moment)."""

    async def turned() -> bool:
        await d.step()
        result = condition()
        return bool(await result) if not isinstance(result, bool) else result

    await wait_until(turned, timeout=20, interval=0.02, what=what)


def verify(received: Received, secret: str, tolerance: int | None = 300) -> None:
    """Stripe's own verifier, given tally's header: raises unless a v1 signature is the secret's."""
    stripe.WebhookSignature.verify_header(received.body.decode(), received.headers[SIGNATURE_HEADER], secret, tolerance)


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


def delivered_count(outcome: str) -> float:
    return metric("tally_webhook_deliveries_total", {"outcome": outcome})


async def delivery_rows(pool: asyncpg.Pool, endpoint_id: str) -> list[asyncpg.Record]:
    return list(
        await pool.fetch("SELECT * FROM webhook_deliveries WHERE endpoint_id = $1::uuid ORDER BY id", endpoint_id)
    )


# ---- the routes --------------------------------------------------------------------------------


async def test_the_secret_is_shown_once_and_only_admin_keys_manage_endpoints(
    private_client: TestClient, pool: asyncpg.Pool, org: Org, other_org: Org
) -> None:
    client, admin = private_client, await admin_headers(pool, org)
    created = await subscribe(client, admin, "https://hooks.example.com/tally", ["customer.created"])
    assert created["secret"].startswith("whsec_") and len(created["secret"]) > 40
    assert created["events"] == ["customer.created"] and created["environment"] == "prod"
    listed = await ok_json(await client.get("/v1/webhooks", headers=admin))
    assert [e["id"] for e in listed["results"]] == [created["id"]]
    one = await ok_json(await client.get(f"/v1/webhooks/{created['id']}", headers=admin))
    assert "secret" not in listed["results"][0] and "secret" not in one
    assert created["secret"] not in str(listed) + str(one)

    for path in ("/v1/webhooks", f"/v1/webhooks/{created['id']}", f"/v1/webhooks/{created['id']}/deliveries"):
        await problem(await client.get(path, headers=org.headers()), 403)  # read and write, not admin
    await problem(
        await client.post(
            "/v1/webhooks", json={"url": "https://a.example", "events": ["alert.budget"]}, headers=org.headers()
        ),
        403,
    )

    # Another organization's admin, and this one's test environment, see nothing of it.
    for headers in (await admin_headers(pool, other_org), await admin_headers(pool, org, "test")):
        assert (await ok_json(await client.get("/v1/webhooks", headers=headers)))["results"] == []
        for method, path in [
            ("GET", f"/v1/webhooks/{created['id']}"),
            ("DELETE", f"/v1/webhooks/{created['id']}"),
            ("POST", f"/v1/webhooks/{created['id']}/rotate"),
            ("GET", f"/v1/webhooks/{created['id']}/deliveries"),
            ("POST", f"/v1/webhooks/{created['id']}/deliveries/1/redeliver"),
        ]:
            await problem(await client.request(method, path, headers=headers), 404)

    rotated = await ok_json(await client.post(f"/v1/webhooks/{created['id']}/rotate", headers=admin))
    assert rotated["secret"] != created["secret"] and rotated["previous_secret_expires_at"]
    r = await client.delete(f"/v1/webhooks/{created['id']}", headers=admin)
    assert r.status == 204
    await problem(await client.get(f"/v1/webhooks/{created['id']}", headers=admin), 404)


async def test_bad_input_is_a_400_naming_the_parameter(
    private_client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    client, admin = private_client, await admin_headers(pool, org)
    bodies = [
        ({"url": "https://a.example", "events": []}, "events"),
        ({"url": "https://a.example", "events": ["customer.exploded"]}, "events.0"),
        ({"url": "https://a.example", "events": ["alert.budget", "alert.budget"]}, "events"),
        ({"url": "ftp://a.example", "events": ["alert.budget"]}, "url"),
        ({"url": "https://user:pw@a.example", "events": ["alert.budget"]}, "url"),
        ({"url": "https://a.example/" + "x" * 2100, "events": ["alert.budget"]}, "url"),
        ({"url": "https://a.example", "events": ["alert.budget"], "secret": "mine"}, "secret"),
        ({"events": ["alert.budget"]}, "url"),
    ]
    for body, name in bodies:
        await problem(await client.post("/v1/webhooks", json=body, headers=admin), 400, name)
    created = await subscribe(client, admin, "https://a.example/hook")
    base = f"/v1/webhooks/{created['id']}"
    for query, name in [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("cursor=abc", "cursor"),
        ("status=x", "status"),
        ("other=1", "other"),
    ]:
        await problem(await client.get(f"{base}/deliveries?{query}", headers=admin), 400, name)
    await problem(
        await client.post(f"{base}/rotate", json={"overlap_seconds": -1}, headers=admin), 400, "overlap_seconds"
    )
    span = {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}
    await problem(await client.post(f"{base}/redeliver", json=span, headers=admin), 400, "to")
    await problem(
        await client.post(
            f"{base}/redeliver", json={"from": "2026-01-01T00:00:00"} | {"to": "2026-01-02T00:00:00Z"}, headers=admin
        ),
        400,
        "from",
    )
    await problem(await client.get("/v1/webhooks/not-a-uuid", headers=admin), 404)
    await problem(await client.post(f"{base}/deliveries/x1/redeliver", headers=admin), 404)
    # The number of endpoints is bounded.
    for _ in range(MAX_ENDPOINTS - 1):
        await subscribe(client, admin, "https://a.example/hook")
    await problem(
        await client.post("/v1/webhooks", json={"url": "https://a.example", "events": ["alert.budget"]}, headers=admin),
        409,
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[fe80::1]/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://localhost:8080/hook",
    ],
)
async def test_non_public_addresses_are_refused_at_creation(
    client: TestClient, pool: asyncpg.Pool, org: Org, url: str
) -> None:
    """The suite's own app: TALLY_WEBHOOK_ALLOW_PRIVATE is off there."""
    body = await problem(
        await client.post(
            "/v1/webhooks", json={"url": url, "events": ["alert.budget"]}, headers=await admin_headers(pool, org)
        ),
        400,
        "url",
    )
    assert "public" in body["detail"]


# ---- deliveries --------------------------------------------------------------------------------


async def test_customer_changes_and_budget_alerts_arrive_signed_so_that_stripes_verifier_accepts_them(
    dispatcher: Make,
    private_client: TestClient,
    private_settings: Settings,
    pool: asyncpg.Pool,
    org: Org,
    receiver: Receiver,
) -> None:
    client, admin = private_client, await admin_headers(pool, org)
    created = await subscribe(client, admin, f"{receiver.url}/hook")
    secret = created["secret"]
    d = dispatcher(private_settings)

    who = uid("hook")
    r = await client.post("/v1/customers", json={"customer_identifier": who, "name": "Ada"}, headers=org.headers())
    assert r.status == 201, await r.text()
    await steps_until(d, lambda: len(receiver.events()) >= 1, "customer.created delivered")
    async with pool.acquire() as conn:  # a budget, then usage past it: the fold records an alert
        await fold_events(conn, cloud_event(org.name, who, "customer.upserted", {"total_budget": "1"}))
        await fold_events(conn, usage(org.name, who, cost="2"))
    await steps_until(d, lambda: any(e["type"] == "alert.budget" for e in receiver.events()), "alert.budget delivered")
    r = await client.delete(f"/v1/customers/{who}", headers=org.headers())
    assert r.status == 204
    await steps_until(d, lambda: receiver.events()[-1]["type"] == "customer.deleted", "customer.deleted delivered")

    events = receiver.events()
    types = [e["type"] for e in events]
    assert types[0] == "customer.created" and types[-1] == "customer.deleted"
    assert "alert.budget" in types and set(types) <= set(ALL_EVENTS)
    first = events[0]
    assert first["data"]["customer_identifier"] == who and first["data"]["name"] == "Ada"
    assert first["organization_id"] == str(org.id) and first["environment"] == "prod"
    alert = next(e for e in events if e["type"] == "alert.budget")
    assert alert["data"]["threshold"] == "total_100" and alert["data"]["customer_identifier"] == who
    assert events[-1]["data"] == {"id": first["data"]["id"], "customer_identifier": who}
    assert len({e["id"] for e in events}) == len(events)
    for got in receiver.received:
        assert got.headers["Content-Type"] == "application/json"
        verify(got, secret)
        with pytest.raises(stripe.SignatureVerificationError):
            verify(got, new_secret())
    rows = await delivery_rows(pool, created["id"])
    assert [r["state"] for r in rows] == ["delivered"] * len(events)

    # The delivery log, paged; a redelivery sends the same event again.
    log = f"/v1/webhooks/{created['id']}/deliveries"
    pages, cursor = [], None
    while True:
        page = await ok_json(
            await client.get(log, params={"limit": 1, **({"cursor": cursor} if cursor else {})}, headers=admin)
        )
        pages.extend(page["results"])
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert [p["event_id"] for p in pages] == [e["id"] for e in reversed(events)]
    assert all(p["status"] == "delivered" and p["attempts"] == 1 and p["last_status_code"] == 200 for p in pages)
    first_id = pages[-1]["id"]
    again = await ok_json(await client.post(f"{log}/{first_id}/redeliver", headers=admin), 202)
    assert again == {"redelivered": 1, "truncated": False}
    await steps_until(d, lambda: len(receiver.events()) == len(events) + 1, "the redelivery")
    assert receiver.received[-1].body == receiver.received[0].body
    span = {
        "from": (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
        "to": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }
    again = await ok_json(await client.post(f"/v1/webhooks/{created['id']}/redeliver", json=span, headers=admin), 202)
    assert again == {"redelivered": len(events), "truncated": False}
    await steps_until(d, lambda: len(receiver.events()) == 2 * len(events) + 1, "the range redelivered")
    assert [e["id"] for e in receiver.events()[-len(events) :]] == [e["id"] for e in events]


async def test_a_budget_recovered_in_a_new_period_is_sent_after_its_alert_to_its_subscribers_only(
    dispatcher: Make,
    private_client: TestClient,
    private_settings: Settings,
    pool: asyncpg.Pool,
    org: Org,
    receiver: Receiver,
) -> None:
    """A daily budget's 80 % alert, then the next day below it: `alert.budget.recovered` names
    the alert it recovers from (its event id) and the period it is below in, signed like any
    delivery; an endpoint that takes only `alert.budget` gets the alert and not the recovery."""
    admin = await admin_headers(pool, org)
    both = await subscribe(private_client, admin, f"{receiver.url}/both", ["alert.budget", "alert.budget.recovered"])
    only = await subscribe(private_client, admin, f"{receiver.url}/alerts", ["alert.budget"])
    d = dispatcher(private_settings)
    who = uid("recovered")
    async with pool.acquire() as conn:
        await fold_events(
            conn, cloud_event(org.name, who, "customer.upserted", {"period_budget": "10", "budget_duration": "daily"})
        )
        await fold_events(conn, usage(org.name, who, cost="9"))
    await steps_until(d, lambda: len(receiver.events("/both")) == 1 and len(receiver.events("/alerts")) == 1, "alerts")
    alert = receiver.events("/both")[0]
    assert alert["type"] == "alert.budget" and alert["data"]["threshold"] == "period_80"
    period_end = datetime.fromisoformat(alert["data"]["period_end"])

    async with pool.acquire() as conn:  # housekeeping's look, a few minutes into the next day
        await alerts_store.record_recoveries(
            conn, period_end - timedelta(seconds=1), period_end, period_end + timedelta(minutes=3)
        )
    await steps_until(d, lambda: len(receiver.events("/both")) == 2, "alert.budget.recovered delivered")
    recovered = receiver.events("/both")[1]
    assert recovered["type"] == "alert.budget.recovered" and recovered["id"] != alert["id"]
    assert datetime.fromisoformat(recovered["created_at"]) == period_end
    data = recovered["data"]
    assert (data["customer_identifier"], data["threshold"], data["share"]) == (who, "period_80", "0.8")
    assert (data["budget"], data["usage"], data["budget_duration"]) == ("10", "0", "daily")
    assert datetime.fromisoformat(data["period_start"]) == period_end
    assert datetime.fromisoformat(data["period_end"]) == period_end + timedelta(days=1)
    assert data["alert"]["id"] == alert["id"]
    assert datetime.fromisoformat(data["alert"]["period_end"]) == period_end
    verify(receiver.received[-1], both["secret"])
    for _ in range(3):
        await d.step()
    assert [r["event_type"] for r in await delivery_rows(pool, only["id"])] == ["alert.budget"]
    assert [r["event_type"] for r in await delivery_rows(pool, both["id"])] == [
        "alert.budget",
        "alert.budget.recovered",
    ]


async def test_only_the_types_subscribed_are_sent(
    dispatcher: Make,
    private_client: TestClient,
    private_settings: Settings,
    pool: asyncpg.Pool,
    org: Org,
    receiver: Receiver,
) -> None:
    admin = await admin_headers(pool, org)
    await subscribe(private_client, admin, f"{receiver.url}/hook", ["customer.deleted"])
    d = dispatcher(private_settings)
    who = uid("only")
    for method, path, body in [
        ("POST", "/v1/customers", {"customer_identifier": who}),
        ("PATCH", f"/v1/customers/{who}", {"name": "B"}),
        ("DELETE", f"/v1/customers/{who}", None),
    ]:
        r = await private_client.request(method, path, json=body, headers=org.headers())
        assert r.status < 300, await r.text()
    await steps_until(d, lambda: len(receiver.events()) >= 1, "the deletion delivered")
    assert [e["type"] for e in receiver.events()] == ["customer.deleted"]


async def test_in_order_per_customer_across_a_receiver_outage(
    dispatcher: Make,
    private_client: TestClient,
    private_settings: Settings,
    pool: asyncpg.Pool,
    org: Org,
    receiver: Receiver,
) -> None:
    """The receiver fails (500) for a while: the customer's first delivery is retried on the
    backoff schedule and its later ones wait behind it; another customer's are not held up.
    Two updates committed before a round are one delivery (each would show the same state)."""
    admin = await admin_headers(pool, org)
    created = await subscribe(private_client, admin, f"{receiver.url}/hook", ["customer.created", "customer.updated"])
    clock = Clock()
    d = dispatcher(private_settings, clock)
    x, y = uid("x"), uid("y")
    receiver.answer = lambda n: 500
    await private_client.post("/v1/customers", json={"customer_identifier": x}, headers=org.headers())
    for name in ("one", "two"):
        await private_client.patch(f"/v1/customers/{x}", json={"name": name}, headers=org.headers())
    await steps_until(d, lambda: len(receiver.received) >= 1, "the first attempt")
    await private_client.patch(f"/v1/customers/{x}", json={"name": "three"}, headers=org.headers())
    for _ in range(3):  # failed, and not due again before its backoff: nothing more is sent
        await d.step()
    assert [(e["type"], e["data"]["customer_identifier"]) for e in receiver.events()] == [("customer.created", x)]

    receiver.answer = lambda n: 200
    await private_client.post("/v1/customers", json={"customer_identifier": y}, headers=org.headers())
    await steps_until(d, lambda: any(e["data"]["customer_identifier"] == y for e in receiver.events()), "y's delivery")
    assert sum(e["data"]["customer_identifier"] == x for e in receiver.events()) == 1  # x's still wait

    # Down for an hour: every retry in it failed; then it answers, and nothing was lost.
    receiver.answer = lambda n: 500
    for _ in range(12):
        clock.advance(300)
        await d.step()
    tried = sum(e["data"]["customer_identifier"] == x for e in receiver.events())
    assert 4 <= tried <= 12, tried  # jitter 0: half of 30 s doubling, retries after 15, 30, 60, 120 s, ...
    receiver.answer = lambda n: 200
    clock.advance(private_settings.webhook_retry_max_seconds)
    await steps_until(
        d,
        lambda: sum(e["data"]["customer_identifier"] == x for e in receiver.events()) >= tried + 3,
        "x's deliveries after the outage",
    )
    xs = [e for e in receiver.events() if e["data"]["customer_identifier"] == x]
    assert [e["type"] for e in xs[-3:]] == ["customer.created", "customer.updated", "customer.updated"]
    assert [e["data"]["name"] for e in xs[-2:]] == ["two", "three"]
    assert len(await delivery_rows(pool, created["id"])) == 4  # x's three and y's one
    assert len({e["id"] for e in xs[:-2]}) == 1  # the same event, retried
    log = await ok_json(await private_client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=admin))
    first = log["results"][-1]
    assert first["attempts"] == tried + 1 and first["status"] == "delivered" and first["last_status_code"] == 200


async def test_a_rotated_secret_and_the_previous_one_both_sign_during_the_overlap(
    dispatcher: Make,
    private_client: TestClient,
    private_settings: Settings,
    pool: asyncpg.Pool,
    org: Org,
    receiver: Receiver,
) -> None:
    admin = await admin_headers(pool, org)
    created = await subscribe(private_client, admin, f"{receiver.url}/hook", ["customer.created"])
    rotated = await ok_json(
        await private_client.post(f"/v1/webhooks/{created['id']}/rotate", json={"overlap_seconds": 600}, headers=admin)
    )
    clock = Clock()
    d = dispatcher(private_settings, clock)
    await private_client.post("/v1/customers", json={"customer_identifier": uid("r")}, headers=org.headers())
    await steps_until(d, lambda: len(receiver.received) == 1, "a delivery in the overlap")
    header = receiver.received[0].headers[SIGNATURE_HEADER]
    assert header.count("v1=") == 2 and header.startswith("t=")
    verify(receiver.received[0], rotated["secret"])
    verify(receiver.received[0], created["secret"])

    clock.advance(601)  # past the overlap: the new secret alone signs
    await private_client.post("/v1/customers", json={"customer_identifier": uid("r")}, headers=org.headers())
    await steps_until(d, lambda: len(receiver.received) == 2, "a delivery after the overlap")
    assert receiver.received[1].headers[SIGNATURE_HEADER].count("v1=") == 1
    verify(receiver.received[1], rotated["secret"], tolerance=None)
    with pytest.raises(stripe.SignatureVerificationError):
        verify(receiver.received[1], created["secret"], tolerance=None)


async def test_two_dispatchers_never_attempt_one_delivery_at_once(
    private_client: TestClient, private_settings: Settings, pool: asyncpg.Pool, org: Org, receiver: Receiver
) -> None:
    admin = await admin_headers(pool, org)
    created = await subscribe(private_client, admin, f"{receiver.url}/slow", ["customer.created", "customer.updated"])
    receiver.slow = 0.05
    people = [uid("two") for _ in range(15)]
    for who in people:
        await private_client.post("/v1/customers", json={"customer_identifier": who}, headers=org.headers())
        await private_client.patch(f"/v1/customers/{who}", json={"name": "again"}, headers=org.headers())
    settings = private_settings.model_copy(update={"webhook_poll_seconds": 0.02, "webhook_concurrency": 4})
    first, second = (Dispatcher(settings, pool, webhook_shape()) for _ in range(2))
    tasks = [asyncio.create_task(x.run()) for x in (first, second)]
    try:
        await wait_until(lambda: _all_delivered(pool, created["id"], 30), timeout=30, what="every delivery made")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await first.close()
        await second.close()
    events = receiver.events("/slow")
    assert receiver.overlaps == 0
    assert len(events) == 30 and len({e["id"] for e in events}) == 30  # leases held: each sent once
    for who in people:
        assert [e["type"] for e in events if e["data"]["customer_identifier"] == who] == [
            "customer.created",
            "customer.updated",
        ]


async def _all_delivered(pool: asyncpg.Pool, endpoint_id: str, n: int) -> bool:
    rows = await delivery_rows(pool, endpoint_id)
    return len(rows) == n and all(r["state"] == "delivered" for r in rows)


async def test_deliveries_pending_in_the_database_are_sent_by_a_new_consumer_process(
    private_client: TestClient, pool: asyncpg.Pool, org: Org, receiver: Receiver, fleet: Fleet
) -> None:
    """A consumer process attempts the deliveries while the receiver fails, and is killed
    (SIGKILL: nothing of it survives but the rows); a new process sends them when the receiver
    is back: a `tally webhooks` (the dispatcher alone) beside a consumer that does not dispatch."""
    admin = await admin_headers(pool, org)
    created = await subscribe(private_client, admin, f"{receiver.url}/hook", ["customer.created"])
    receiver.answer = lambda n: 503
    env = {
        "tally_webhook_allow_private": "true",
        "tally_webhook_poll_seconds": "0.05",
        "tally_webhook_retry_base_seconds": "0.2",
        "tally_webhook_retry_max_seconds": "0.5",
        # A delivery the killed process had leased waits out its lease (the timeout and 5 s).
        "tally_webhook_timeout_seconds": "2",
    }
    first = fleet.start("first", **env)
    people = [uid("restart") for _ in range(3)]
    for who in people:
        await private_client.post("/v1/customers", json={"customer_identifier": who}, headers=org.headers())

    async def attempted() -> bool:
        rows = await delivery_rows(pool, created["id"])
        return len(rows) == 3 and all(r["attempts"] >= 1 for r in rows)

    await wait_until(attempted, timeout=30, what="every delivery attempted by the first process")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert all(r["state"] == "pending" for r in await delivery_rows(pool, created["id"]))

    receiver.answer = lambda n: 200
    quiet = fleet.start("quiet", **env, tally_webhook_dispatch="false")
    second = fleet.start("second", "webhooks", **env)
    await wait_until(lambda: _all_delivered(pool, created["id"], 3), timeout=30, what="sent by the second process")
    assert {r.event["data"]["customer_identifier"] for r in receiver.received} == set(people)
    for got in receiver.received:
        verify(got, created["secret"])
    second.assert_no_errors()
    quiet.assert_no_errors()
    async with aiohttp.ClientSession() as http:
        for process, delivered in ((second, 3.0), (quiet, 0.0)):
            await process.wait_ready(http)
            async with http.get(f"{process.url}/metrics") as r:
                text = await r.text()
            assert f'tally_webhook_deliveries_total{{outcome="delivered"}} {delivered}' in text or (
                delivered == 0 and 'outcome="delivered"' not in text
            ), process.name


# ---- what a delivery may reach and read --------------------------------------------------------


async def _endpoint(pool: asyncpg.Pool, org: Org, url: str, events: list[str]) -> str:
    """An endpoint written directly (past the creation's address check: what DNS may answer later)."""
    async with pool.acquire() as conn:
        row = await store.create_endpoint(conn, org.id, "prod", url, events, new_secret(), most=MAX_ENDPOINTS)
    return str(row["id"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
async def test_non_public_addresses_are_refused_at_send_time(
    dispatcher: Make,
    settings: Settings,
    pool: asyncpg.Pool,
    org: Org,
    receiver: Receiver,
    client: TestClient,
    host: str,
) -> None:
    port = receiver.url.rsplit(":", 1)[1]
    endpoint_id = await _endpoint(pool, org, f"http://{host}:{port}/hook", ["customer.created"])
    d = dispatcher(settings)  # TALLY_WEBHOOK_ALLOW_PRIVATE off
    refused = delivered_count("refused")
    await client.post("/v1/customers", json={"customer_identifier": uid("ssrf")}, headers=org.headers())

    async def tried() -> bool:
        rows = await delivery_rows(pool, endpoint_id)
        return bool(rows) and rows[0]["attempts"] >= 1

    await steps_until(d, tried, "an attempt")
    row = (await delivery_rows(pool, endpoint_id))[0]
    assert row["state"] == "pending" and row["last_error"].startswith("refused"), row["last_error"]
    assert receiver.received == []
    assert delivered_count("refused") > refused


async def test_redirects_are_not_followed_and_long_answers_are_cut_short(
    dispatcher: Make,
    private_settings: Settings,
    pool: asyncpg.Pool,
    org: Org,
    receiver: Receiver,
    private_client: TestClient,
) -> None:
    redirecting = await _endpoint(pool, org, f"{receiver.url}/redirect", ["customer.created"])
    huge = await _endpoint(pool, org, f"{receiver.url}/huge", ["customer.created"])
    d = dispatcher(private_settings)
    await private_client.post("/v1/customers", json={"customer_identifier": uid("redir")}, headers=org.headers())

    async def both_tried() -> bool:
        rows = [await delivery_rows(pool, e) for e in (redirecting, huge)]
        return all(r and r[0]["attempts"] for r in rows)

    started = time.monotonic()
    await steps_until(d, both_tried, "both attempted")
    assert time.monotonic() - started < private_settings.webhook_timeout_seconds
    moved = (await delivery_rows(pool, redirecting))[0]
    assert moved["state"] == "pending" and moved["last_status_code"] == 302
    assert "redirect" in moved["last_error"]
    assert [r.path for r in receiver.received if r.path == "/target"] == []
    long = (await delivery_rows(pool, huge))[0]
    assert long["state"] == "delivered" and long["last_status_code"] == 200
    assert receiver.huge_written < 64 * 2**20  # the connection closed long before the end


async def test_an_endpoint_failing_continuously_is_disabled(
    dispatcher: Make,
    private_settings: Settings,
    pool: asyncpg.Pool,
    org: Org,
    receiver: Receiver,
    private_client: TestClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.answer = lambda n: 500
    endpoint_id = await _endpoint(pool, org, f"{receiver.url}/hook", ["customer.created"])
    clock = Clock()
    d = dispatcher(private_settings, clock)
    disabled_before = metric("tally_webhook_disabled_total")
    await private_client.post("/v1/customers", json={"customer_identifier": uid("down")}, headers=org.headers())
    await steps_until(d, lambda: len(receiver.received) == 1, "the first attempt")
    started = clock()

    async def disabled() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT disabled_at IS NOT NULL FROM webhook_endpoints WHERE id = $1::uuid", endpoint_id
            )
        )

    with caplog.at_level(logging.WARNING, logger="tally.webhooks"):
        while not await disabled():
            assert clock() - started < 4 * 86_400, "not disabled after days of failures"
            clock.advance(private_settings.webhook_retry_max_seconds)
            await d.step()
    hours = (clock() - started) / 3600
    assert private_settings.webhook_disable_after_hours <= hours <= private_settings.webhook_disable_after_hours + 1.1
    assert metric("tally_webhook_disabled_total") >= disabled_before + 1
    assert any("disabled" in r.getMessage() for r in caplog.records)
    sent = len(receiver.received)
    clock.advance(private_settings.webhook_retry_max_seconds)
    await d.step()
    assert len(receiver.received) == sent  # a disabled endpoint gets nothing more
    await d.watch_backlog()
    assert metric("tally_webhook_endpoints_disabled") >= 1


async def test_endpoints_of_one_environment_share_the_rounds_read_of_the_feed(pool: asyncpg.Pool, org: Org) -> None:
    """Three endpoints created one after another (so each starts at its own position), then
    a fold: one round reads the feed once for the environment, and each endpoint gets from
    that page exactly the changes after its own cursor, with its cursor moved past them."""
    endpoints = [
        UUID(await _endpoint(pool, org, f"https://hooks{i}.example.com/tally", ["customer.created"])) for i in range(3)
    ]
    idents = [uid("shared") for _ in range(4)]
    async with pool.acquire() as conn:
        assert set(await fold_events(conn, *(usage(org.name, ident) for ident in idents))) == {"applied"}

    async def below_the_horizon() -> bool:
        async with pool.acquire() as conn:
            page = await read_feed(conn, org.id, "prod", Cursor(Position(0)), 100, webhook_shape())
        return len(page.changes) == len(idents)

    await wait_until(below_the_horizon, what="the fold's changes below the horizon")
    now, pages = datetime.now(UTC), {}  # type: ignore[var-annotated]

    async def round_(shared: dict | None) -> list[int]:
        async with pool.acquire() as conn:
            return [
                (
                    await store.materialize(
                        conn, org.id, e, webhook_shape(), now, now + timedelta(days=3), limit=100, pages=shared
                    )
                ).deliveries
                for e in endpoints
            ]

    assert await round_(pages) == [len(idents)] * 3
    assert list(pages) == [(org.id, "prod")]  # one read for the three
    for e in endpoints:
        rows = await delivery_rows(pool, str(e))
        assert sorted(orjson.loads(r["body"])["data"]["customer_identifier"] for r in rows) == sorted(idents)
    assert await round_(None) == [0, 0, 0]  # each cursor moved past what it was given


async def test_deliveries_are_made_as_the_receiver_takes_them_unless_the_backlog_grows_old(
    private_settings: Settings, pool: asyncpg.Pool, org: Org, receiver: Receiver
) -> None:
    """An endpoint with its room of pending deliveries (here 2) gets no more made while its
    backlog is young: they are made as the receiver takes them. A backlog older than the age
    bound is made at once, so that nothing waits in the change log past its retention."""
    endpoint = await _endpoint(pool, org, f"{receiver.url}/hook", ["customer.created"])
    clock = Clock()
    d = Dispatcher(private_settings, pool, webhook_shape(), clock=clock, jitter=lambda: 0.0, ahead=2)
    try:
        receiver.answer = lambda n: 500  # nothing is taken: every delivery stays pending
        first, later = [uid("room") for _ in range(3)], [uid("late") for _ in range(3)]
        async with pool.acquire() as conn:
            await fold_events(conn, *(usage(org.name, ident) for ident in first))

        async def made(n: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return len(await delivery_rows(pool, endpoint)) == n

            return check

        await steps_until(d, await made(3), "the first changes made into deliveries")
        async with pool.acquire() as conn:
            await fold_events(conn, *(usage(org.name, ident) for ident in later))

        async def readable() -> bool:  # the later fold's changes below the horizon: a round could take them
            async with pool.acquire() as conn:
                page = await read_feed(conn, org.id, "prod", Cursor(Position(0)), 100, webhook_shape())
            return len(page.changes) == 6

        await wait_until(readable, what="the later changes readable")
        for _ in range(3):
            await d.step()
        assert len(await delivery_rows(pool, endpoint)) == 3  # 3 pending, room for 2: none made

        clock.advance(timedelta(minutes=6).total_seconds())  # the backlog is old now: made at once
        await steps_until(d, await made(6), "the old backlog made into deliveries")

        receiver.answer = lambda n: 200
        clock.advance(private_settings.webhook_retry_max_seconds)
        async with pool.acquire() as conn:
            await fold_events(conn, usage(org.name, uid("after")))

        async def all_sent() -> bool:
            rows = await delivery_rows(pool, endpoint)
            return len(rows) == 7 and all(r["state"] == "delivered" for r in rows)

        await steps_until(d, all_sent, "room again once the receiver took them")
    finally:
        await d.close()


async def test_while_the_fold_has_a_backlog_deliveries_are_made_and_sent_at_the_yield_rate(
    private_settings: Settings, pool: asyncpg.Pool, org: Org, receiver: Receiver
) -> None:
    """Beside a fold that is behind, the dispatcher sends TALLY_WEBHOOK_YIELD_RATE deliveries a
    second at most (a second's worth saved) and makes deliveries in one pass per round, no
    more than it would send until the next; once the fold has caught up, the rest go at once."""
    endpoint = await _endpoint(pool, org, f"{receiver.url}/hook", ["customer.created"])
    behind = True
    clock = FrozenClock()
    settings = private_settings.model_copy(update={"webhook_yield_rate": 1})
    paced = int(settings.webhook_yield_rate * YIELD_MATERIALIZE_GAP)  # made per pass while yielding
    d = Dispatcher(settings, pool, webhook_shape(), clock=clock, jitter=lambda: 0.0, behind=lambda: behind)
    try:
        idents = [uid("busy") for _ in range(2 * paced)]
        async with pool.acquire() as conn:
            await fold_events(conn, *(usage(org.name, ident) for ident in idents))

        async def readable() -> bool:  # every change below the horizon: a round could take them all
            async with pool.acquire() as conn:
                page = await read_feed(conn, org.id, "prod", Cursor(Position(0)), 100, webhook_shape())
            return len(page.changes) == len(idents)

        await wait_until(readable, what="the changes readable")
        await d.step()
        assert len(await delivery_rows(pool, endpoint)) == paced
        assert len(receiver.events()) == 1  # the ration: a second's worth
        await d.step()
        assert len(receiver.events()) == 1  # spent, and no time has passed
        clock.advance(1.0)
        await d.step()
        assert len(receiver.events()) == 2

        behind = False  # caught up: no ration
        await steps_until(d, lambda: len(receiver.events()) == len(idents), "the rest sent at once")
        assert sorted(e["data"]["customer_identifier"] for e in receiver.events()) == sorted(idents)
    finally:
        await d.close()
