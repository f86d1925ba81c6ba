"""The Citus distribution plan (docs/citus.md), checked: every statement tally ran against a
distributed table during the session constrains ``organization_id``, so Citus can route it
by organization. tests/statementcapture.py captures the statements and judges the plans;
conftest.py runs this module last, so under ``make test`` it judges the whole suite's
statements, and its own workload (every kind of route, the fold, housekeeping) makes it
meaningful when run alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from service.infra.settings import Settings
from service.store import alerts, housekeeping, windows
from tests.consumerkit import barrier, running_consumer
from tests.eventkit import Broker, usage
from tests.factories import Org, insert_customer
from tests.statementcapture import CAPTURE, DISTRIBUTED, LOCAL, REFERENCE, Verdict, judge

# Statements that scan a distributed table without an organization: Citus runs them on every
# shard in parallel, which is what these periodic, tenant-wide jobs mean to do.
GLOBAL_JOBS = {
    # customer_counts deltas folded for all organizations at once (a multi-shard CTE).
    "service/store/housekeeping.py:compact_counts": "compacts every organization's count deltas",
    # relays unpublished alerts whatever their organization (SKIP LOCKED, small and indexed).
    "service/store/alerts.py:relay_alerts": "relays every organization's unpublished alerts",
    # alerts whose budget period ended since the last look, whatever their organization.
    "service/store/alerts.py:record_recoveries": "records every organization's budget recoveries",
    # tombstones older than the dedupe window, for all organizations.
    "service/store/housekeeping.py:purge_processed": "purges expired tombstones of every organization",
    # change-log rows past the feed's retention, for all organizations.
    "service/store/housekeeping.py:purge_changes": "purges every organization's expired change-log rows",
    # the webhook dispatcher's look for endpoints with new events, its claim of due deliveries,
    # its backlog gauges and its purge of finished deliveries: all organizations'.
    "service/store/webhooks.py:endpoints_with_work": "finds every organization's endpoints with new events",
    "service/store/webhooks.py:claim": "leases due deliveries of every organization",
    "service/store/webhooks.py:backlog": "measures every organization's pending deliveries",
    "service/store/webhooks.py:purge_finished": "purges every organization's finished deliveries",
}
# Statements whose organization comes per row from a batch (unnest of the batch's keys):
# the fold writes a batch that may span organizations in one statement per table.
PER_ROW_ALLOWED = (
    "service/store/fold.py:",
    "service/store/apply.py:",
    "service/store/alerts.py:",
    "service/store/changelog.py:",
    # the streams one commit wakes read their pages together: each ask probes its own
    # organization's change log and customers
    "service/store/changefeed.py:read_feeds",
    # each endpoint (of any organization) probes the change log and the alerts of its own; a
    # materialisation inserts one organization's deliveries ($1) from the arrays of its events
    "service/store/webhooks.py:endpoints_with_work",
    "service/store/webhooks.py:materialize",
    # every organization (a reference table) probes its own window sums' mark
    "service/store/windows.py:due",
    # a chunk of one organization's customers, its ids (and the organization, once per id) from
    # arrays: a constant organization would let a stale plan scan the organization per chunk
    "service/store/windows.py:roll",
)


async def test_every_table_is_placed_in_the_distribution_plan(pool: asyncpg.Pool) -> None:
    tables = {
        r["table_name"]: r["org"]
        for r in await pool.fetch(
            """SELECT table_name, bool_or(column_name = 'organization_id') AS org
               FROM information_schema.columns WHERE table_schema = 'public'
               AND table_name IN (SELECT tablename FROM pg_tables WHERE schemaname = 'public')
               GROUP BY table_name"""
        )
    }
    assert set(tables) == DISTRIBUTED | REFERENCE | LOCAL, "a table is missing from docs/citus.md's plan"
    assert all(tables[t] for t in DISTRIBUTED), "a distributed table lacks organization_id"


async def _workload(client: TestClient, settings: Settings, pool: asyncpg.Pool, broker: Broker, org: Org) -> None:
    """Every kind of statement tally runs: each list shape, retrieve, writes, usage, the
    compatibility routes, the fold of every event type, housekeeping."""
    h = org.headers()
    parent = await insert_customer(pool, org, "citus_parent")
    for params in (
        {},
        {"sort_by": "-total_cost", "status": "active,draft", "name": "x", "include": "subscriptions"},
        {"sort_by": "name", "email": "a@example.com", "expand": "parent_customer", "metadata[plan]": "pro"},
        {"page": "2", "page_size": "10", "first_seen_gte": "2020-01-01T00:00:00Z", "total_cost_lte": "5"},
        {"customer_ids": str(parent["id"]), "parent_customer_ids": str(parent["id"])},
    ):
        r = await client.get("/v1/customers", params=params, headers=h)
        assert r.status == 200, await r.text()
    r = await client.get("/v1/customers", params={"limit": "1"}, headers=h)
    cursor = (await r.json())["next_cursor"]
    if cursor:
        assert (await client.get("/v1/customers", params={"cursor": cursor}, headers=h)).status == 200
    r = await client.post("/v1/customers", json={"customer_identifier": "citus_c1", "name": "C"}, headers=h)
    assert r.status == 201, await r.text()
    for method, path, body in (
        ("GET", "/v1/customers/citus_c1?include=subscriptions&expand=parent_customer", None),
        ("PATCH", "/v1/customers/citus_c1", {"name": "D", "period_budget": "1", "budget_duration": "monthly"}),
        ("GET", "/v1/customers/citus_c1/usage?granularity=week", None),
        ("GET", "/compat/respan/api/users/list/", None),
        ("GET", "/compat/flexprice/v1/customers?limit=5", None),
        ("GET", "/compat/public/api/public/customers?include_subscriptions=true", None),
        ("DELETE", "/v1/customers/citus_c1", None),
    ):
        r = await client.request(method, path, json=body, headers=h)
        assert r.status < 300, (method, path, await r.text())
    now = datetime.now(UTC)
    events: list[dict] = [usage(org.name, f"citus_u{i}", cost="0.7") for i in range(5)]
    events.append({**usage(org.name, "citus_u0"), "type": "customer.upserted", "data": {"name": "N"}})
    events.append(
        {
            **usage(org.name, "citus_u1"),
            "type": "subscription.upserted",
            "data": {
                "id": "sub_1",
                "status": "active",
                "current_period_start": now.isoformat(),
                "current_period_end": (now + timedelta(days=30)).isoformat(),
                "plan": None,
            },
        }
    )
    r = await client.post("/v1/customers", json={"customer_identifier": "citus_b", "period_budget": "1"}, headers=h)
    assert r.status == 201, await r.text()
    events.append(usage(org.name, "citus_b", cost="2"))  # crosses its budget: an alert
    async with running_consumer(settings, pool, broker):
        await broker.publish(events)
        await barrier(pool, broker, org)
        await broker.publish(
            {**usage(org.name, "citus_u2", when=now + timedelta(seconds=1)), "type": "customer.deleted", "data": {}}
        )
        await barrier(pool, broker, org)
    async with pool.acquire() as conn:
        await housekeeping.compact_counts(conn)
        await housekeeping.purge_processed(conn, timedelta(days=35))
        await alerts.record_recoveries(conn, now - timedelta(days=1), now, now)
        for organization_id, day in await windows.due(conn, timedelta(0)):
            if organization_id == org.id:
                await windows.roll(conn, organization_id, day)

    async def publish(event: dict[str, object]) -> None:
        return None

    await alerts.relay_alerts(pool, publish, limit=100)


@pytest.mark.citus_last
async def test_every_statement_on_a_distributed_table_routes_by_organization(
    client: TestClient, settings: Settings, pool: asyncpg.Pool, broker: Broker, org: Org, database_name: str
) -> None:
    await _workload(client, settings, pool, broker, org)
    mine = [s for s in CAPTURE.statements.values() if s.database == database_name]
    assert len(mine) >= 20, f"too few statements captured ({len(mine)}): is the capture installed?"
    async with pool.acquire() as conn:
        verdicts: list[Verdict] = [await judge(conn, s) for s in mine]

    def allowed(v: Verdict) -> bool:
        if v.routing == "unconstrained":
            return v.statement.caller in GLOBAL_JOBS
        if v.routing == "per-row":
            return v.statement.caller.startswith(PER_ROW_ALLOWED)
        return v.routing == "single-shard"

    wrong = [v for v in verdicts if not allowed(v)]
    report = "\n\n".join(
        f"{v.routing} {v.unconstrained} from {v.statement.caller}:\n{v.statement.query.strip()[:600]}" for v in wrong
    )
    assert not wrong, f"{len(wrong)} statement(s) would not route by organization on Citus:\n{report}"
    routing = {r: sum(v.routing == r for v in verdicts) for r in ("single-shard", "per-row", "unconstrained")}
    print(f"citus routing of {len(verdicts)} distinct statements: {routing}")
    assert routing["single-shard"] > 0 and routing["per-row"] > 0
