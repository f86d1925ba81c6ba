"""Regression tests for the hostile probe's defects in the domain: organizations that
spell another's id, API writes against late deletions, DELETE racing a fold, subscriptions
across environments, and input that could never apply answered at once with a 400."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient

from service.domain.events import InvalidEvent, validate_event
from service.infra.settings import Settings
from service.store import auth
from service.store.fold import FoldResult, Outcome, fold
from tests.factories import Org, make_org
from tests.support import ok_json, problem, uid

RETENTION = timedelta(days=35)


def now() -> datetime:
    return datetime.now(UTC)


def event(
    org: Org | str,
    subject: str,
    kind: str = "usage.recorded",
    *,
    at: datetime | None = None,
    data: dict | None = None,
    environment: str = "prod",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "probe",
        "type": kind,
        "time": (at or now() - timedelta(seconds=1)).isoformat(),
        "subject": subject,
        "organization": org if isinstance(org, str) else org.name,
        "environment": environment,
        "data": {"requests": 1, "cost": "1"} if data is None and kind == "usage.recorded" else (data or {}),
        **extra,
    }


async def fold_raw(conn: asyncpg.Connection, *raws: dict) -> list[Outcome]:
    result: FoldResult = await fold(conn, [validate_event(r, now()) for r in raws], retention=RETENTION)
    return result.outcomes


# ---- 1. an organization named like another organization's id ----------------------------


@pytest.mark.parametrize(
    "spelling",
    [str, lambda u: str(u).upper(), lambda u: u.hex, lambda u: "{" + str(u) + "}", lambda u: "urn:uuid:" + str(u)],
)
async def test_an_organization_cannot_be_named_like_an_id(pool: asyncpg.Pool, org: Org, spelling) -> None:
    name = spelling(org.id)
    async with pool.acquire() as conn:
        with pytest.raises(ValueError, match="reads as a UUID"):
            await auth.create_organization(conn, name)
        # The database refuses it too, whoever writes the row.
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO organizations (name) VALUES ($1)", name)


async def test_ids_win_for_events_and_keys(pool: asyncpg.Pool, org: Org) -> None:
    async with pool.acquire() as conn:
        key = await auth.create_key(conn, str(org.id), ("read",))
        assert key.organization_id == org.id
        outcomes = await fold_raw(conn, event(str(org.id), "by_id"), event(org.name, "by_name"))
        assert [o.status for o in outcomes] == ["applied", "applied"]
        owners = await conn.fetch(
            "SELECT DISTINCT organization_id FROM customers WHERE customer_identifier = ANY($1)", ["by_id", "by_name"]
        )
    assert [r[0] for r in owners] == [org.id]


def test_the_cli_refuses_a_uuid_name(migrated: str, settings: Settings) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "orgs", "create", str(uuid.uuid4())],
        env={**os.environ, "TALLY_DATABASE_URL": settings.database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    assert "reads as a UUID" in result.stderr


# ---- 3. an old customer.deleted against API writes ---------------------------------------


async def test_an_old_deletion_leaves_a_customer_created_after_it(
    client: TestClient, pool: asyncpg.Pool, org: Org
) -> None:
    ident = uid("e_api")
    await ok_json(
        await client.post("/v1/customers", json={"customer_identifier": ident, "name": "Api"}, headers=org.headers()),
        201,
    )
    async with pool.acquire() as conn:
        [outcome] = await fold_raw(conn, event(org, ident, "customer.deleted", at=now() - timedelta(hours=1)))
    assert outcome.status == "applied"
    body = await ok_json(await client.get(f"/v1/customers/{ident}", headers=org.headers()))
    assert body["name"] == "Api"


async def test_an_old_deletion_removes_only_what_it_predates(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    """Usage 2 h ago, PATCH now, a deletion stamped 1 h ago: the usage goes, the PATCH stays."""
    ident = uid("late")
    async with pool.acquire() as conn:
        await fold_raw(conn, event(org, ident, at=now() - timedelta(hours=2), data={"requests": 2, "cost": "5"}))
    await ok_json(
        await client.patch(f"/v1/customers/{ident}", json={"email": "new@example.com"}, headers=org.headers())
    )
    async with pool.acquire() as conn:
        await fold_raw(conn, event(org, ident, "customer.deleted", at=now() - timedelta(hours=1)))
    body = await ok_json(await client.get(f"/v1/customers/{ident}", headers=org.headers()))
    assert (body["email"], body["number_of_requests"], body["total_cost"], body["first_seen"]) == (
        "new@example.com",
        0,
        "0",
        None,
    )


async def test_an_api_delete_makes_older_late_events_stale(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid("gone")
    async with pool.acquire() as conn:
        await fold_raw(conn, event(org, ident, at=now() - timedelta(minutes=10)))
    assert (await client.delete(f"/v1/customers/{ident}", headers=org.headers())).status == 204
    async with pool.acquire() as conn:
        late, newer = await fold_raw(
            conn,
            event(org, ident, at=now() - timedelta(minutes=5)),
            event(org, ident, at=now() + timedelta(seconds=30)),
        )
    assert (late.status, newer.status) == ("stale", "applied")
    body = await ok_json(await client.get(f"/v1/customers/{ident}", headers=org.headers()))
    assert body["number_of_requests"] == 1


# ---- 4. DELETE racing a fold --------------------------------------------------------------


async def _blocked_on_lock(pool: asyncpg.Pool, waiters: int) -> None:
    """Until ``waiters`` backends of this database wait on a row lock."""
    for _ in range(2000):
        n = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if n >= waiters:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"expected {waiters} backends waiting on a lock")


@pytest.mark.parametrize("kind", ["usage.recorded", "subscription.upserted"])
@pytest.mark.parametrize("event_is_newer", [True, False])
async def test_delete_racing_a_fold_loses_nothing(
    client: TestClient, pool: asyncpg.Pool, settings: Settings, org: Org, kind: str, event_is_newer: bool
) -> None:
    """The probe held the row (SELECT … FOR UPDATE), sent DELETE, then an event for the same
    customer: the usage was recorded as processed but never applied, and a subscription
    raised KeyError and killed the consumer. Now the event is judged against the deletion's
    time whichever gets the row first: newer recreates the customer, older is stale."""
    ident = uid("race")
    async with pool.acquire() as conn:
        await fold_raw(conn, event(org, ident, at=now() - timedelta(minutes=1)))
    data = {"id": "sub_race", "status": "active", "plan": None} if kind == "subscription.upserted" else None
    holder = await asyncpg.connect(settings.database_url)
    folder = await asyncpg.connect(settings.database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "SELECT 1 FROM customers WHERE organization_id = $1 AND customer_identifier = $2 FOR UPDATE", org.id, ident
        )
        deleting = asyncio.ensure_future(client.delete(f"/v1/customers/{ident}", headers=org.headers()))
        await _blocked_on_lock(pool, 1)
        at = now() + timedelta(seconds=30) if event_is_newer else now() - timedelta(seconds=30)
        folding = asyncio.ensure_future(fold_raw(folder, event(org, ident, kind, at=at, data=data)))
        await _blocked_on_lock(pool, 2)
        await tx.commit()
        response, [outcome] = await asyncio.gather(deleting, folding)
    finally:
        await holder.close()
        await folder.close()
    assert response.status == 204
    r = await client.get(f"/v1/customers/{ident}", params={"include": "subscriptions"}, headers=org.headers())
    if not event_is_newer:
        assert outcome.status in ("applied", "stale")  # applied first then deleted, or stale after
        await problem(r, 404)
        return
    assert outcome.status == "applied"
    body = await ok_json(r)
    if kind == "usage.recorded":
        assert body["number_of_requests"] == 1  # only the event after the deletion
    else:
        assert [s["id"] for s in body["subscriptions"]] == ["sub_race"]


# ---- 6. subscriptions are per customer, so per environment -------------------------------


async def test_the_same_subscription_id_in_two_environments(pool: asyncpg.Pool, org: Org) -> None:
    sub = {"id": "sub_shared", "status": "active", "plan": None}
    async with pool.acquire() as conn:
        await fold_raw(conn, event(org, "acct", "subscription.upserted", data=sub))
        await fold_raw(
            conn, event(org, "acct", "subscription.upserted", data={**sub, "status": "canceled"}, environment="test")
        )
        rows = await conn.fetch(
            "SELECT c.environment, s.status FROM subscriptions s JOIN customers c"
            " ON c.organization_id = s.organization_id AND c.id = s.customer_id"
            " WHERE s.organization_id = $1 AND s.id = 'sub_shared' ORDER BY 1",
            org.id,
        )
    assert [tuple(r) for r in rows] == [("prod", "active"), ("test", "canceled")]


# ---- 8, 13: what could never apply is a 400 at POST /v1/events ---------------------------


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth):
        value = {"k": value}
    return value


def with_deep_metadata(document: dict, depth: int) -> bytes:
    """``document`` as JSON with ``metadata`` nested ``depth`` levels (written by hand: no JSON
    encoder nests that deep)."""
    head = orjson.dumps({**document, "metadata": None})[: -len(b"null}")]
    return head + b'{"k":' * depth + b'{"leaf":1}' + b"}" * depth + b"}"


@pytest.mark.parametrize("depth", [33, 254, 300, 1000])
async def test_deep_metadata_is_a_400_everywhere(client: TestClient, org: Org, depth: int) -> None:
    json_headers = {**org.headers(), "Content-Type": "application/json"}
    body = with_deep_metadata({"customer_identifier": uid()}, depth)
    await problem(await client.post("/v1/customers", data=body, headers=json_headers), 400)
    upsert = event(org, "deep", "customer.upserted", data={})
    body = orjson.dumps(upsert)[: -len(b"{}}")] + with_deep_metadata({}, depth) + b"}"
    await problem(await client.post("/v1/events", data=body, headers=json_headers), 400)
    with pytest.raises(InvalidEvent, match="nested deeper"):
        validate_event(event(org, "deep", "customer.upserted", data={"metadata": nested(depth)}), now())


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"time": (now() - timedelta(days=37)).isoformat()}, "dedupe window"),
        ({"subject": "a\x00b"}, "NUL"),
        ({"id": "x\x00"}, "NUL"),
        ({"type": "customer.upserted", "data": {"metadata": {"k\x00": 1}}}, "NUL"),
        (
            {
                "type": "subscription.upserted",
                "data": {"id": "s", "status": "active", "current_period_end": "0001-01-01T00:00:00+05:00"},
            },
            "0001-01-01",
        ),
        ({"type": "customer.upserted", "data": {"metadata": {"big": 123456789012345678901234567890}}}, "2^53"),
        ({"data": {"cost": "1e-30"}}, "decimal places"),
    ],
)
async def test_events_that_could_never_apply_are_refused_at_once(
    client: TestClient, org: Org, change: dict, fragment: str
) -> None:
    raw = {**event(org, "refused"), **change}
    del raw["organization"]
    body = await problem(await client.post("/v1/events", json=raw, headers=org.headers()), 400)
    assert fragment in body["detail"], body


# ---- 9: usage series at the edges of the calendar -----------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "name"),
    [("0001-01-01", "0001-01-01", "from"), ("9999-12-01", "9999-12-31", "from"), ("2026-01-01", "9999-12-31", "to")],
)
async def test_usage_series_out_of_range_is_a_400(
    client: TestClient, pool: asyncpg.Pool, org: Org, start: str, end: str, name: str
) -> None:
    ident = uid()
    async with pool.acquire() as conn:
        await fold_raw(conn, event(org, ident))
    for granularity in ("day", "month"):
        r = await client.get(
            f"/v1/customers/{ident}/usage",
            params={"from": start, "to": end, "granularity": granularity},
            headers=org.headers(),
        )
        await problem(r, 400, name)


async def test_usage_series_defaults_to_the_last_30_days(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    ident = uid()
    async with pool.acquire() as conn:
        await fold_raw(conn, event(org, ident, data={"requests": 4, "cost": "2"}))
    body = await ok_json(await client.get(f"/v1/customers/{ident}/usage", headers=org.headers()))
    today = now().date()
    assert (body["from"], body["to"], body["granularity"]) == (str(today - timedelta(days=29)), str(today), "day")
    assert len(body["results"]) == 30 and body["results"][-1]["requests"] == 4


# ---- 14, 15: wrong answers to bad input ---------------------------------------------------


@pytest.mark.parametrize("param", ["first_seen_gte", "first_seen_lte", "last_active_gte", "last_active_lte"])
@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+01:00"])
async def test_timestamps_past_the_calendar_are_a_400(client: TestClient, org: Org, param: str, value: str) -> None:
    await problem(await client.get("/v1/customers", params={param: value}, headers=org.headers()), 400, param)


@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+01:00"])
async def test_last_purchase_date_past_the_calendar_is_a_400(client: TestClient, org: Org, value: str) -> None:
    ident = uid()
    r = await client.post(
        "/v1/customers", json={"customer_identifier": ident, "last_purchase_date": value}, headers=org.headers()
    )
    await problem(r, 400, "last_purchase_date")
    await ok_json(await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers()), 201)
    r = await client.patch(f"/v1/customers/{ident}", json={"last_purchase_date": value}, headers=org.headers())
    await problem(r, 400, "last_purchase_date")


async def test_big_metadata_numbers_are_refused_not_rounded(client: TestClient, org: Org) -> None:
    raw = b'{"customer_identifier": "big", "metadata": {"n": 123456789012345678901234567890}}'
    r = await client.post("/v1/customers", data=raw, headers={**org.headers(), "Content-Type": "application/json"})
    body = await problem(r, 400, "metadata")
    assert "2^53" in body["detail"]


async def test_queue_statistics_need_the_ops_scope(client: TestClient, pool: asyncpg.Pool) -> None:
    tenant = await make_org(pool)
    async with pool.acquire() as conn:
        admin = await auth.create_key(conn, tenant.name, ("admin",))
    r = await client.get("/v1/ops/queues", headers={"Authorization": f"Bearer {admin.key}"})
    await problem(r, 403)


async def test_a_batch_with_nothing_to_apply_folds(pool: asyncpg.Pool, org: Org) -> None:
    """Every event rejected (unknown organization, too old): nothing to record, no error."""
    async with pool.acquire() as conn:
        result = await fold(
            conn,
            [
                validate_event(event("no-such-org", "x"), now()),
                validate_event(event(org, "y", at=now() - timedelta(days=40)), now()),
            ],
            retention=RETENTION,
        )
    assert [o.status for o in result.outcomes] == ["rejected", "rejected"]
