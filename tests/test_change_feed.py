"""The change feed, ``GET /v1/customers/changes`` (service/api/changefeed.py,
service/store/changefeed.py): JSON pages after a cursor, and the same changes pushed as
Server-Sent Events after each commit — from API writes and folds alike, per organization and
environment only, resumable, told to resync when the log no longer holds what follows its
position; across API processes too."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.api import appkeys
from service.api.app import create_app
from service.api.changefeed import wants_stream
from service.api.changewatch import SharedReads
from service.api.webhooks import webhook_shape
from service.infra import metrics
from service.infra.settings import Settings
from service.store.changefeed import START, Cursor, FeedAsk, Thresholds, read_feed, read_feeds
from service.store.changelog import Position
from service.store.housekeeping import purge_changes
from service.web import server
from tests.eventkit import Broker, cloud_event, fold_events, usage, wait_until
from tests.factories import Org
from tests.processes import TallyProcess, free_port
from tests.support import ok_json, problem, uid

FEED = "/v1/customers/changes"
STREAM = {"Accept": "text/event-stream"}
# A change is readable once every transaction older than it has ended — on the whole server,
# other databases' included (service/store/changelog.py): a long write elsewhere (a bulk load
# of a benchmark's database) holds every change back until it ends. Waits allow for that.
HORIZON_WAIT = 300.0


# ---- cursors and negotiation ------------------------------------------------------------------


def test_cursors_print_as_they_parse() -> None:
    assert str(Cursor.parse("7301.4")) == "7301.4" and Cursor.parse("7301.4").given == 0
    within = Cursor.parse("7301.4.2")
    assert within == Cursor(Position(7301, 4), 2) and str(within) == "7301.4.2"
    assert within.floor == Position(7301, 3)  # the row itself is still needed
    for bad in ("", "7301", "a.b", "1.2.3.4", "1.0.1", "-1.2", "1.2.x"):
        with pytest.raises(ValueError):
            Cursor.parse(bad)


def test_an_event_stream_is_chosen_by_accept() -> None:
    from aiohttp.test_utils import make_mocked_request

    def accepts(value: str | None) -> bool:
        headers = {"Accept": value} if value is not None else {}
        return wants_stream(make_mocked_request("GET", FEED, headers=headers))

    assert accepts("text/event-stream") and accepts("application/json, text/event-stream;q=0.5")
    assert not accepts(None) and not accepts("application/json") and not accepts("text/event-stream;q=0")


# ---- JSON pages -------------------------------------------------------------------------------


async def page(client: TestClient, org: Org, key: str | None = None, **params: Any) -> dict[str, Any]:
    return await ok_json(await client.get(FEED, params=params, headers=org.headers(key)))


async def changes(
    client: TestClient, org: Org, n: int, key: str | None = None, **params: Any
) -> tuple[list[dict[str, Any]], str]:
    """Follow the feed from ``params`` until ``n`` changes have come (a commit is readable once
    every transaction older than it has ended); the changes and the cursor reached."""
    got: list[dict[str, Any]] = []
    cursor = params.pop("after", None)

    async def more() -> bool:
        nonlocal cursor
        body = await page(client, org, key, **params, **({"after": cursor} if cursor else {}))
        got.extend(body["results"])
        cursor = body["next_cursor"]
        return len(got) >= n

    await wait_until(more, timeout=HORIZON_WAIT, what=f"{n} changes in the feed")
    assert cursor is not None
    return got, cursor


def seen(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["customer"]["customer_identifier"], r["kind"]) for r in results]


async def test_api_writes_page_in_order_and_continue_from_next_cursor(client: TestClient, org: Org) -> None:
    a, b = uid("a"), uid("b")
    # A client lists, then follows the feed from the list's as_of: it misses nothing after.
    start = (await ok_json(await client.get("/v1/customers", headers=org.headers())))["as_of"]
    for ident in (a, b):
        await ok_json(
            await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers()), 201
        )
    await ok_json(await client.patch(f"/v1/customers/{a}", json={"name": "renamed"}, headers=org.headers()))
    assert (await client.delete(f"/v1/customers/{b}", headers=org.headers())).status == 204
    got, _ = await changes(client, org, 4, after=start)
    assert seen(got) == [(a, "created"), (b, "deleted"), (a, "updated"), (b, "deleted")]
    # Each change shows the customer as it is now: a's name, b gone (id and identifier only).
    assert got[0]["customer"]["name"] == "renamed" and got[0]["customer"]["total_cost"] == "0"
    assert set(got[1]["customer"]) == {"id", "customer_identifier"}
    # Pages of one continue exactly where the last left off; each change's cursor resumes after it.
    first = await page(client, org, after=start, limit=1)
    assert first["has_more"] and first["limit"] == 1 and len(first["results"]) == 1
    assert first["next_cursor"] == first["results"][0]["cursor"]
    rest, _ = await changes(client, org, 3, after=first["next_cursor"])
    assert [r["cursor"] for r in rest] == [r["cursor"] for r in got[1:]]


async def test_a_fold_logs_created_updated_deleted_and_pages_inside_one_transaction(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    a, b, c = uid("a"), uid("b"), uid("c")
    async with pool.acquire() as conn:
        # One batch, one transaction, one log row of three customers (in key order).
        await fold_events(
            conn, usage(org.name, a, cost="1"), usage(org.name, b, cost="2"), usage(org.name, c, cost="3")
        )
        await fold_events(conn, usage(org.name, a, cost="5"))
        await fold_events(conn, cloud_event(org.name, c, "customer.deleted", {}))
    got, end = await changes(client, org, 5)
    assert seen(got) == [(a, "created"), (b, "created"), (c, "deleted"), (a, "updated"), (c, "deleted")]
    assert got[0]["customer"]["total_cost"] == "6"
    # A page may end inside a transaction's changes: its cursor says how many were given.
    two = await page(client, org, limit=2)
    assert Cursor.parse(two["next_cursor"]).given == 2 and seen(two["results"]) == seen(got[:2])
    after = await page(client, org, after=two["next_cursor"], limit=1)
    assert seen(after["results"]) == seen(got[2:3])
    # Nothing new: the cursor stays, the page is empty.
    idle = await page(client, org, after=end)
    assert idle["results"] == [] and not idle["has_more"]


async def test_a_change_committed_late_under_an_older_transaction_is_never_skipped(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    early, late = uid("a"), uid("b")
    start = (await page(client, org))["next_cursor"]
    async with pool.acquire() as slow, pool.acquire() as quick:
        older = slow.transaction()
        await older.start()
        try:
            await fold_events(slow, usage(org.name, early, cost="1"))  # its id is older, its commit later
            await fold_events(quick, usage(org.name, late, cost="1"))  # committed first
            held = await page(client, org, after=start)
            # The later commit is not given while the older transaction runs: a cursor past it
            # would skip the older one's change for good.
            assert held["results"] == []
        finally:
            await older.commit()
    got, _ = await changes(client, org, 2, after=held["next_cursor"])
    assert seen(got) == [(early, "created"), (late, "created")]


async def test_filters_by_identifier_and_thresholds(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    cheap, dear, gone = uid("a"), uid("b"), uid("c")
    async with pool.acquire() as conn:
        await fold_events(
            conn, usage(org.name, cheap, cost="1"), usage(org.name, dear, cost="50"), usage(org.name, gone, cost="1")
        )
        await fold_events(conn, cloud_event(org.name, gone, "customer.deleted", {}))
    await changes(client, org, 4)  # all committed and readable
    named = await page(client, org, customer_identifiers=f"{dear},{gone}")
    assert seen(named["results"]) == [(dear, "created"), (gone, "deleted"), (gone, "deleted")]
    costly = await page(client, org, min_total_cost="10")
    # Deletions pass every threshold: a client cannot know what the customer had.
    assert seen(costly["results"]) == [(dear, "created"), (gone, "deleted"), (gone, "deleted")]
    assert seen((await page(client, org, min_number_of_requests=2))["results"]) == [(gone, "deleted")] * 2


async def test_a_key_sees_only_its_organization_and_environment(client: TestClient, org: Org, other_org: Org) -> None:
    ident = uid()
    await ok_json(await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers()), 201)
    await ok_json(
        await client.post("/v1/customers", json={"customer_identifier": uid()}, headers=org.headers(org.test_key)), 201
    )
    await changes(client, org, 1)
    await changes(client, org, 1, key=org.test_key)
    assert seen((await page(client, org))["results"]) == [(ident, "created")]  # not the test environment's
    assert all(
        r["customer"]["customer_identifier"] != ident for r in (await page(client, other_org))["results"]
    )  # nor another organization's, from the oldest change on
    await problem(await client.get(FEED, params={"environment": "test"}, headers=org.headers()), 403)


async def test_bad_parameters_are_named(client: TestClient, org: Org) -> None:
    for params, name in (
        ({"after": "nonsense"}, "after"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"min_total_cost": "-1"}, "min_total_cost"),
        ({"since": "1"}, "since"),
        ({"customer_identifiers": "a,,b"}, "customer_identifiers"),
        ({"customer_identifiers": ",".join(["a"] * 1001)}, "customer_identifiers"),
    ):
        await problem(await client.get(FEED, params=params, headers=org.headers()), 400, name)
    await problem(
        await client.get(FEED, headers={"Last-Event-ID": "x", **STREAM, **org.headers()}), 400, "Last-Event-ID"
    )
    # A page does not resume from the header, but does not take a malformed one either.
    await problem(await client.get(FEED, headers={"Last-Event-ID": "x" * 100, **org.headers()}), 400, "Last-Event-ID")


async def test_the_feed_is_not_a_customer_called_changes(client: TestClient, org: Org) -> None:
    await ok_json(
        await client.post("/v1/customers", json={"customer_identifier": "changes"}, headers=org.headers()), 201
    )
    assert "results" in await page(client, org)
    for method in ("PATCH", "DELETE"):
        assert (await client.request(method, FEED, json={}, headers=org.headers())).status == 405
    listed = await ok_json(
        await client.get("/v1/customers", params={"customer_identifiers": "changes"}, headers=org.headers())
    )
    assert [c["customer_identifier"] for c in listed["results"]] == ["changes"]


async def age_out(pool: asyncpg.Pool, org: Org) -> None:
    """Make the organization's logged changes older than the retention, and purge."""
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE customer_changes SET changed_at = now() - interval '100 hours' WHERE organization_id = $1", org.id
        )
        await purge_changes(conn, timedelta(hours=72))


async def test_a_cursor_older_than_the_log_is_gone(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    first, second = uid("a"), uid("b")
    async with pool.acquire() as conn:
        await fold_events(conn, usage(org.name, first, cost="1"))
        await fold_events(conn, usage(org.name, second, cost="1"))
    got, end = await changes(client, org, 2)
    await age_out(pool, org)
    body = await problem(
        await client.get(FEED, params={"after": got[0]["cursor"]}, headers=org.headers()), 410, "after"
    )
    assert "as_of" in body["detail"]
    # Past everything purged, nothing was missed: a current cursor still reads.
    assert (await page(client, org, after=end))["results"] == []
    # And from the oldest retained, a new change follows.
    third = uid("c")
    async with pool.acquire() as conn:
        await fold_events(conn, usage(org.name, third, cost="1"))
    assert seen((await changes(client, org, 1))[0]) == [(third, "created")]


# ---- event streams ----------------------------------------------------------------------------


@dataclass
class Event:
    kind: str
    id: str | None
    data: dict[str, Any] | None


class Reader:
    """Server-Sent Events read from a response, one at a time (comments as kind ':')."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, timeout: float = HORIZON_WAIT, *, comments: bool = False) -> Event:
        async with asyncio.timeout(timeout):
            fields: dict[str, str] = {}
            while True:
                line = (await self.response.content.readline()).decode()
                assert line, "the stream ended"
                line = line.rstrip("\n")
                if line.startswith(":"):
                    if comments:
                        return Event(":", None, None)
                    continue
                if line:
                    name, _, value = line.partition(": ")
                    fields[name] = value
                    continue
                if fields:
                    data = orjson.loads(fields["data"]) if "data" in fields else None
                    return Event(fields.get("event", "message"), fields.get("id"), data)


@pytest.fixture
async def feed_app(migrated: str, settings: Settings) -> AsyncIterator[TestClient]:
    """An API with a short heartbeat, one stream per key, and a second for a client to take what is sent."""
    tuned = settings.model_copy(
        update={
            "change_stream_heartbeat_seconds": 0.2,
            "change_streams_per_key": 1,
            "change_stream_send_timeout": 1.0,
        }
    )
    async with TestClient(TestServer(create_app(tuned))) as c:
        yield c


async def open_stream(client: TestClient, org: Org, **headers: str) -> aiohttp.ClientResponse:
    response = await client.get(FEED, headers={**STREAM, **org.headers(), **headers})
    assert response.status == 200, await response.text()
    assert response.content_type == "text/event-stream"
    return response


async def test_a_stream_pushes_each_commit_and_heartbeats_while_idle(feed_app: TestClient, org: Org) -> None:
    response = await open_stream(feed_app, org)
    try:
        reader = Reader(response)
        assert (await reader.next(comments=True)).kind == ":"  # a heartbeat, with nothing to say
        ident = uid()
        await ok_json(
            await feed_app.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers()), 201
        )
        created = await reader.next()
        assert created.kind == "created" and created.data is not None
        assert created.data["customer"]["customer_identifier"] == ident and created.id == created.data["cursor"]
        await ok_json(await feed_app.patch(f"/v1/customers/{ident}", json={"name": "n"}, headers=org.headers()))
        updated = await reader.next()
        assert updated.kind == "updated" and updated.data is not None and updated.data["customer"]["name"] == "n"
    finally:
        response.close()


async def test_last_event_id_resumes_with_exactly_the_missed_changes(
    feed_app: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    idents = [uid(f"{i}") for i in range(3)]
    async with pool.acquire() as conn:
        for ident in idents:
            await fold_events(conn, usage(org.name, ident, cost="1"))
    got, _ = await changes(feed_app, org, 3)
    response = await open_stream(feed_app, org, **{"Last-Event-ID": got[0]["cursor"]})
    try:
        reader = Reader(response)
        resumed = [await reader.next(), await reader.next()]
        assert [(e.id, e.kind) for e in resumed] == [(g["cursor"], "created") for g in got[1:]]
        # and nothing else: the next thing on the stream is a heartbeat.
        assert (await reader.next(comments=True)).kind == ":"
    finally:
        response.close()


async def test_a_stream_too_far_behind_is_told_to_resync(feed_app: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    async with pool.acquire() as conn:
        await fold_events(conn, usage(org.name, uid(), cost="1"))
        await fold_events(conn, usage(org.name, uid(), cost="1"))
    got, _ = await changes(feed_app, org, 2)
    await age_out(pool, org)
    response = await open_stream(feed_app, org, **{"Last-Event-ID": got[0]["cursor"]})
    try:
        told = await Reader(response).next()
        assert told.kind == "resync" and told.data is not None and told.data["after"] == got[0]["cursor"]
        assert await response.content.read() == b""  # and the stream ends
    finally:
        response.close()


async def test_streams_per_key_are_capped(feed_app: TestClient, org: Org, other_org: Org) -> None:
    response = await open_stream(feed_app, org)
    try:
        await Reader(response).next(comments=True)
        refused = await feed_app.get(FEED, headers={**STREAM, **org.headers()})
        body = await problem(refused, 429)
        assert "TALLY_CHANGE_STREAMS_PER_KEY" in body["detail"] and "Retry-After" in refused.headers
        # Another key is not held back, and JSON pages never are.
        (await open_stream(feed_app, other_org)).close()
        await page(feed_app, org)
    finally:
        response.close()

    async def freed() -> bool:
        again = await feed_app.get(FEED, headers={**STREAM, **org.headers()})
        again.close()
        return again.status == 200

    await wait_until(freed, what="the closed stream's slot to be given back")


async def test_shutdown_ends_open_streams_at_once(migrated: str, settings: Settings, org: Org) -> None:
    # tally's own runner (service/web/server.py): its drain waits a minute for requests in
    # flight, and a stream must not be one of them. The heartbeat is far off: a stream that
    # noticed the shutdown only when it next woke would outlast the bounds below.
    settings = settings.model_copy(update={"change_stream_heartbeat_seconds": 300})
    app = create_app(settings)
    app_runner = server.runner(app)
    await app_runner.setup()
    watch = app[appkeys.CHANGE_WATCH]

    async def listening() -> bool:  # else the stream polls, and notices anything at its next poll
        return watch.listening

    await wait_until(listening, what="the change listener")
    port = free_port()
    listener = await server.listen(app_runner, settings, "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}{FEED}"
            async with session.get(url, headers={**STREAM, **org.headers()}) as response:
                assert response.status == 200
                before = ended("shutdown")
                listener.close()
                await asyncio.wait_for(app_runner.cleanup(), 20)
                assert ended("shutdown") == before + 1
                assert await asyncio.wait_for(response.content.read(), 20) == b""  # the stream ended
    finally:
        listener.close()
        await app_runner.cleanup()


def ended(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("tally_change_streams_ended_total", {"reason": reason}) or 0.0


async def test_a_client_that_stops_reading_is_sent_resync_and_dropped(
    feed_app: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    # More than the server's socket buffer can hold (tcp_wmem's ceiling is 4 MiB on Linux by
    # default): 6,000 customers of about a kilobyte each, folded in one transaction.
    async with pool.acquire() as conn:
        await fold_events(conn, *(usage(org.name, f"slow-{i:05}", cost="1") for i in range(6000)))
    await changes(feed_app, org, 1)  # readable
    before = ended("slow")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (feed_app.host, feed_app.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        key = org.headers()["Authorization"]
        writer.write(
            f"GET {FEED}?limit=1000 HTTP/1.1\r\nHost: test\r\nAuthorization: {key}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")

        async def dropped() -> bool:
            return ended("slow") > before

        await wait_until(dropped, timeout=HORIZON_WAIT, what="the stream to give up on a client that stopped reading")
        # What was queued is still delivered, resync last, and then the connection closes.
        rest = await asyncio.wait_for(reader.read(), 60)
        assert b"event: created" in rest and rest.rsplit(b"event: ", 1)[1].startswith(b"resync\n")
    finally:
        writer.close()


async def test_a_write_through_one_api_process_reaches_a_stream_on_another(
    settings: Settings, migrated: str, pool: asyncpg.Pool, org: Org, broker: Broker, tmp_path: Path
) -> None:
    env = {"TALLY_SHED_DELAY": "0", "TALLY_IP_RATE_LIMIT_BURST": "100000", "TALLY_CHANGE_STREAM_HEARTBEAT_SECONDS": "1"}
    apis = [TallyProcess(f"api{i}", settings, broker, tmp_path, env, command="api") for i in range(2)]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2 * HORIZON_WAIT)) as session:
            for api in apis:
                await api.wait_ready(session)
            writer, streamer = apis
            async with session.get(f"{streamer.url}{FEED}", headers={**STREAM, **org.headers()}) as response:
                assert response.status == 200
                reader = Reader(response)
                await reader.next(comments=True)  # the stream is open and idle
                ident = uid()
                async with session.post(
                    f"{writer.url}/v1/customers", json={"customer_identifier": ident}, headers=org.headers()
                ) as r:
                    assert r.status == 201, await r.text()
                created = await reader.next()
                assert created.kind == "created" and created.data is not None
                assert created.data["customer"]["customer_identifier"] == ident
                # A fold (the consumer's path) reaches it the same way.
                async with pool.acquire() as conn:
                    await fold_events(conn, cloud_event(org.name, ident, "customer.deleted", {}))
                deleted = await reader.next()
                assert deleted.kind == "deleted" and deleted.data is not None
                assert deleted.data["customer"] == {"id": created.data["customer"]["id"], "customer_identifier": ident}
    finally:
        for api in apis:
            await api.terminate()
            api.close()


# ---- one read for the streams one commit wakes ----------------------------------------------------


async def test_reads_asked_together_run_as_one_batch_and_the_same_read_is_joined() -> None:
    runs: list[list[str]] = []
    started, gate = asyncio.Event(), asyncio.Event()

    async def run(keys: list[str]) -> list[str]:
        runs.append(keys)
        started.set()
        await gate.wait()
        return [f"page of {k}" for k in keys]

    reads: SharedReads[str, str] = SharedReads(run)
    first = [asyncio.ensure_future(reads.read("a")) for _ in range(5)]
    other = asyncio.ensure_future(reads.read("b"))
    await started.wait()
    # Asked while that batch runs: a new read waits for the next batch, the same read joins.
    late, again = asyncio.ensure_future(reads.read("c")), asyncio.ensure_future(reads.read("a"))
    gate.set()
    assert await asyncio.gather(*first, again) == ["page of a"] * 6
    assert await other == "page of b" and await late == "page of c"
    assert runs == [["a", "b"], ["c"]] and reads.joined == 5 and reads.batches == 2
    # Landed: the next read of the same key runs again (it may see newer commits).
    assert await reads.read("a") == "page of a"
    assert runs[-1] == ["a"]


async def test_a_reader_leaving_does_not_cancel_the_read_for_the_others() -> None:
    gate = asyncio.Event()

    async def run(keys: list[str]) -> list[int]:
        await gate.wait()
        return [7 for _ in keys]

    reads: SharedReads[str, int] = SharedReads(run)
    leaving = asyncio.ensure_future(reads.read("k"))
    staying = asyncio.ensure_future(reads.read("k"))
    await asyncio.sleep(0)
    leaving.cancel()
    gate.set()
    assert await staying == 7
    assert leaving.cancelled()


async def test_a_failed_batch_fails_each_of_its_readers_and_is_not_kept() -> None:
    attempts = 0

    async def run(keys: list[str]) -> list[int]:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)
        if attempts == 1:
            raise ConnectionResetError("database went away")
        return [1 for _ in keys]

    reads: SharedReads[str, int] = SharedReads(run)
    results = await asyncio.gather(reads.read("k"), reads.read("k"), reads.read("j"), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionResetError] * 3
    assert await reads.read("k") == 1 and attempts == 2


async def test_pages_read_together_are_the_pages_read_alone(pool: asyncpg.Pool, org: Org, other_org: Org) -> None:
    """One pair of statements for many pages (the streams a commit wakes, over organizations,
    cursors, identifiers and thresholds) gives each the page it would get read alone."""
    async with pool.acquire() as conn:
        await fold_events(
            conn,
            *(usage(org.name, f"a-{i}", requests=i + 1) for i in range(6)),
            *(usage(other_org.name, f"b-{i}", requests=1) for i in range(3)),
        )
        await fold_events(conn, usage(org.name, "a-0", requests=10), usage(other_org.name, "b-9", requests=1))
        after_first = (await read_feed(conn, org.id, "prod", START, 1, webhook_shape())).next
        asks = [
            FeedAsk(org.id, "prod", START, 100),
            FeedAsk(other_org.id, "prod", START, 100),
            FeedAsk(org.id, "prod", START, 3),
            FeedAsk(org.id, "prod", after_first, 100),
            FeedAsk(org.id, "prod", START, 100, identifiers=frozenset({"a-2", "a-0"})),
            FeedAsk(org.id, "prod", START, 100, thresholds=Thresholds(number_of_requests=4)),
            FeedAsk(other_org.id, "test", START, 100),
        ]
        together = await read_feeds(conn, asks, webhook_shape())
        alone = [
            await read_feed(
                conn,
                a.organization_id,
                a.environment,
                a.after,
                a.limit,
                webhook_shape(),
                identifiers=a.identifiers,
                thresholds=a.thresholds,
            )
            for a in asks
        ]
    assert together == alone
    shown = [[c.customer_identifier for c in page.changes] for page in together]
    assert shown[1] == ["b-0", "b-1", "b-2", "b-9"] and shown[6] == []
    assert len(shown[2]) == 3 and together[2].more
    assert set(shown[4]) == {"a-0", "a-2"} and "a-0" in shown[3]
    assert set(shown[5]) == {"a-0", "a-3", "a-4", "a-5"}


async def test_streams_woken_by_one_commit_share_one_read(migrated: str, settings: Settings, org: Org) -> None:
    """Eight streams of one key and scope, one commit: every stream gets the change, and the
    process read the feed for them fewer times than there are streams."""
    tuned = settings.model_copy(update={"change_stream_heartbeat_seconds": 30, "change_streams_per_key": 8})
    async with TestClient(TestServer(create_app(tuned))) as client:
        responses = [await open_stream(client, org) for _ in range(8)]
        try:
            reads = client.server.app[appkeys.CHANGE_STREAMS].reads
            before = reads.joined
            ident = uid("shared")
            await ok_json(
                await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers()), 201
            )
            got = [await Reader(r).next() for r in responses]
            assert {(e.kind, e.data["customer"]["customer_identifier"]) for e in got if e.data} == {("created", ident)}
            assert len(got) == 8
            assert reads.joined > before
        finally:
            for r in responses:
                r.close()


def test_a_cursor_orders_after_the_changes_it_has_seen() -> None:
    row, later = Position(100, 3), Position(100, 4)
    assert Cursor(row, 1).order() < Cursor(row, 2).order() < Cursor(row).order() < Cursor(later, 1).order()
    assert Cursor(Position(99, 9)).order() < Cursor(row, 1).order()
