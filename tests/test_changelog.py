"""The change log (service/store/changelog.py): every committed write, from events or the API,
logs which customers it changed and how, in the write's own transaction, and notifies
'organization:environment' at commit; a reader below its snapshot's horizon never misses a
change that commits later with an older transaction id."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from service.store.changelog import CHANNEL, Logged, Position, horizon, parse_notice, read_changes, read_log
from tests.eventkit import cloud_event, fold_events, usage, wait_until
from tests.factories import Org
from tests.support import ok_json, uid


async def settled(conn: asyncpg.Connection) -> None:
    """Wait until every transaction that committed before now is below readers' horizon. The
    horizon is the server's: a write transaction open anywhere on it (another database's
    included) holds it back until it ends."""
    marker = Position(int(await conn.fetchval("SELECT pg_current_xact_id()::text")))

    async def passed() -> bool:
        return await horizon(conn) > marker

    await wait_until(passed, what="the horizon to pass the transactions committed so far")


async def everything(pool: asyncpg.Pool, org: Org, environment: str = "prod") -> list[tuple[str, str]]:
    """(identifier, kind) of every logged change of the organization, in log order."""
    async with pool.acquire() as conn:
        await settled(conn)
        logged, _ = await read_changes(conn, org.id, environment, Position(0), 10_000)
    return [(ident, kind) for row in logged for ident, kind in zip(row.customer_identifiers, row.kinds, strict=True)]


async def test_api_writes_log_created_updated_deleted(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid()
    await ok_json(await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers()), 201)
    await ok_json(await client.patch(f"/v1/customers/{ident}", json={"name": "n"}, headers=org.headers()))
    assert (await client.delete(f"/v1/customers/{ident}", headers=org.headers())).status == 204
    assert await everything(pool, org) == [(ident, "c"), (ident, "u"), (ident, "d")]


async def test_events_log_what_they_change_and_nothing_else(pool: asyncpg.Pool, org: Org) -> None:
    first, second, ghost = uid("a"), uid("b"), uid()  # a batch logs its customers in key order
    async with pool.acquire() as conn:
        await fold_events(conn, usage(org.name, first, cost="1"), usage(org.name, second, cost="2"))
        await fold_events(conn, usage(org.name, first, cost="3"))
        # Deleting a customer that never existed changes nothing anyone could have seen.
        assert await fold_events(conn, cloud_event(org.name, ghost, "customer.deleted", {})) == ["applied"]
        await fold_events(conn, cloud_event(org.name, second, "customer.deleted", {}))
        # A duplicate changes nothing.
        event = usage(org.name, first, cost="5")
        await fold_events(conn, event)
        assert await fold_events(conn, event) == ["duplicate"]
    assert await everything(pool, org) == [(first, "c"), (second, "c"), (first, "u"), (second, "d"), (first, "u")]


async def test_environments_are_logged_apart(pool: asyncpg.Pool, org: Org) -> None:
    ident = uid()
    async with pool.acquire() as conn:
        await fold_events(conn, cloud_event(org.name, ident, "customer.upserted", {"name": "t"}, environment="test"))
    assert await everything(pool, org, "test") == [(ident, "c")]
    assert await everything(pool, org, "prod") == []


async def test_a_rolled_back_write_logs_and_notifies_nothing(pool: asyncpg.Pool, org: Org, migrated: str) -> None:
    listener = await asyncpg.connect(migrated)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(CHANNEL, lambda *args: heard.put_nowait(args[3]))
    try:
        async with pool.acquire() as conn:
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await fold_events(conn, usage(org.name, uid(), cost="1"))
                    raise RuntimeError("abandon the batch")
            assert await everything(pool, org) == []
            ident = uid()
            await fold_events(conn, usage(org.name, ident, cost="1"))
        # The committed batch's notice is the first heard: the rolled-back one sent none.
        notice = await asyncio.wait_for(heard.get(), 10)
        assert parse_notice(notice) == (org.id, "prod")
        assert await everything(pool, org) == [(ident, "c")]
    finally:
        await listener.close()


async def test_a_reader_waits_for_older_transactions_before_passing_newer_ones(
    pool: asyncpg.Pool, org: Org, migrated: str
) -> None:
    """Transaction ids are taken at the first write, not at commit: a change committed by a
    younger transaction is held back while an older one is still open, so a reader that moves
    on from the position it reached cannot skip the older one's change."""
    older, younger = uid(), uid()
    slow = await asyncpg.connect(migrated)
    try:
        tx = slow.transaction()
        await tx.start()
        await slow.execute("SELECT pg_current_xact_id()")  # the older transaction id, taken now
        async with pool.acquire() as conn:
            await fold_events(conn, usage(org.name, younger, cost="1"))
            first = await read_log(conn, org.id, "prod", Position(0), 100)
            assert first.rows == []  # committed, but above the open transaction's id
            assert first.held_back  # and the read says so: its reader polls again
            reached = first.reached
            await fold_events(slow, usage(org.name, older, cost="1"))
            await tx.commit()
            await settled(conn)
            rest, after = await read_changes(conn, org.id, "prod", reached, 100)
            assert not (await read_log(conn, org.id, "prod", after, 100)).held_back
        assert [r.customer_identifiers for r in rest] == [[older], [younger]]  # in transaction-id order
        assert after > reached
    finally:
        await slow.close()


async def test_pages_resume_where_they_stopped(pool: asyncpg.Pool, org: Org) -> None:
    idents = [uid() for _ in range(5)]
    async with pool.acquire() as conn:
        for ident in idents:
            await fold_events(conn, usage(org.name, ident, cost="1"))
        await settled(conn)
        pages: list[list[Logged]] = []
        position = Position(0)
        while True:
            page, position = await read_changes(conn, org.id, "prod", position, 2)
            if not page:
                break
            pages.append(page)
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [r.customer_identifiers[0] for p in pages for r in p] == idents
        # Read to its end, the position moves past the last row, to the horizon: a client that
        # resumes from there does not read the last rows again.
        assert position > pages[-1][-1].position


@pytest.mark.parametrize("text", ["", "1", "1.", ".1", "a.b", "-1.2", "1.2.3", f"{2**63}.0", "1." + "9" * 20])
def test_malformed_positions_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Position.parse(text)


def test_positions_round_trip_and_order() -> None:
    assert Position.parse(str(Position(123, 4))) == Position(123, 4)
    assert Position(5, 0) > Position(4, 99) > Position(4, 1)
