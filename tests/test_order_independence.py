"""Order independence as a property (docs/concepts/order-independence.md; service/store/fold.py).

Hypothesis draws random histories of usage, profile upserts, deletions and subscription
events for a few customers in two environments, with colliding times (ties broken by
source and id), hints, duplicates and redeliveries; folds them into the real PostgreSQL in a
random order, split into random batches, on one or two concurrent connections (two
consumers), refolding some batches as a consumer that crashed between commit and ack would;
and requires the database to end in the state of an independent reference model:

- a deletion at T removes everything stamped at or before T, whenever either arrives;
- usage sums over the live events, each distinct event once, each UTC day once, and per
  day, model and provider likewise;
- each profile field holds the value of its newest write (time, then source and id), an
  upsert beating a usage event's hint; each subscription its newest event.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings

from service.domain.events import validate_event
from service.store import auth
from service.store.fold import fold
from tests.orderkit import EXAMPLES, NOW, RETENTION, State, model, schedules

# ---- the database side ------------------------------------------------------------------

DEFAULTS = {"status": "active", "metadata": {}}
COLUMNS = ("name", "email", "phone", "status", "metadata", "total_budget", "address_city", "address_country")


async def observed(conn: asyncpg.Connection, org: Any) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in await conn.fetch(
        "SELECT *, total_budget::text AS budget_text FROM customer_rows WHERE organization_id = $1", org
    ):
        row = {**dict(r), "metadata": orjson.loads(r["metadata"]), "days": {}, "subscriptions": {}}
        out[(r["environment"], r["customer_identifier"])] = row
    for r in await conn.fetch(
        "SELECT c.environment, c.customer_identifier, d.day, d.requests, d.cost FROM daily_usage d"
        " JOIN customers c ON c.organization_id = d.organization_id AND c.id = d.customer_id"
        " WHERE d.organization_id = $1",
        org,
    ):
        out[(r["environment"], r["customer_identifier"])]["days"][r["day"]] = (r["requests"], r["cost"])
    for r in await conn.fetch(
        "SELECT c.environment, c.customer_identifier, d.day, d.model, d.provider, d.requests, d.cost"
        " FROM daily_model_usage d"
        " JOIN customers c ON c.organization_id = d.organization_id AND c.id = d.customer_id"
        " WHERE d.organization_id = $1",
        org,
    ):
        models = out[(r["environment"], r["customer_identifier"])].setdefault("models", {})
        models[(r["day"], r["model"], r["provider"])] = (r["requests"], r["cost"])
    for r in await conn.fetch(
        "SELECT c.environment, c.customer_identifier, s.id, s.status, s.plan_name, s.plan_amount FROM subscriptions s"
        " JOIN customers c ON c.organization_id = s.organization_id AND c.id = s.customer_id"
        " WHERE s.organization_id = $1",
        org,
    ):
        out[(r["environment"], r["customer_identifier"])]["subscriptions"][r["id"]] = (
            r["status"],
            r["plan_name"],
            r["plan_amount"],
        )
    return out


def assert_matches(want: dict[tuple[str, str], State], got: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(got) == set(want), {"missing": set(want) - set(got), "unexpected": set(got) - set(want)}
    for key, w in want.items():
        g = got[key]
        assert (g["number_of_requests"], g["prompt_tokens"], g["completion_tokens"], g["total_cost"]) == (
            w.requests,
            w.prompt_tokens,
            w.completion_tokens,
            w.cost,
        ), key
        assert g["total_tokens"] == w.prompt_tokens + w.completion_tokens, key
        assert g["latency_count"] == len(w.latency) and abs(g["latency_sum"] - sum(w.latency)) < 1e-9, key
        assert (g["first_seen"], g["last_active"]) == (w.first_seen, w.last_active), key
        assert g["active_days"] == len(w.days) and g["days"] == w.days, key
        assert g.get("models", {}) == w.models, key
        for column in COLUMNS:
            expected = w.fields[column][1] if column in w.fields else DEFAULTS.get(column)
            actual = g["budget_text"] if column == "total_budget" else g[column]
            if column == "total_budget" and expected is not None:
                expected = str(Decimal(expected))
            assert actual == expected, (key, column, actual, expected)
        assert g["subscriptions"] == {sid: value for sid, (_, value) in w.subscriptions.items()}, key


# ---- the property -----------------------------------------------------------------------


async def _run(dsn: str, history: list[dict], schedule: list[tuple[list[dict], int, bool]]) -> None:
    conns = [await asyncpg.connect(dsn), await asyncpg.connect(dsn)]
    try:
        name = f"prop-{os.urandom(5).hex()}"
        org = await auth.create_organization(conns[0], name)
        queues: list[list[tuple[list[dict], bool]]] = [[], []]
        for batch, consumer, refold in schedule:
            queues[consumer].append(([{**e, "organization": name} for e in batch], refold))

        async def consume(conn: asyncpg.Connection, batches: list[tuple[list[dict], bool]]) -> None:
            for raws, refold in batches:
                events = [validate_event(raw, NOW) for raw in raws]
                for _ in range(2 if refold else 1):  # a crash between commit and ack redelivers
                    result = await fold(conn, events, retention=RETENTION, now=NOW)
                    assert {o.status for o in result.outcomes} <= {"applied", "duplicate", "stale"}, result

        await asyncio.gather(*(consume(c, q) for c, q in zip(conns, queues, strict=True)))
        assert_matches(model(history), await observed(conns[0], org))
        counts = await conns[0].fetch(
            "SELECT environment, status, sum(delta)::int AS n FROM customer_counts WHERE organization_id = $1"
            " GROUP BY 1, 2 HAVING sum(delta) <> 0",
            org,
        )
        rows = await conns[0].fetch(
            "SELECT environment, status, count(*)::int AS n FROM customers WHERE organization_id = $1 GROUP BY 1, 2",
            org,
        )
        assert {tuple(r) for r in counts} == {tuple(r) for r in rows}
        orphans = await conns[0].fetchval(
            "SELECT count(*) FROM daily_model_usage d WHERE d.organization_id = $1 AND NOT EXISTS"
            " (SELECT FROM customers c WHERE c.organization_id = d.organization_id AND c.id = d.customer_id)",
            org,
        )
        assert orphans == 0, "a removed customer's per-model rows outlived it"
    finally:
        for conn in conns:
            await conn.close()


# Each example runs against the database, so shrinking a failure is slow: a failing history
# is printed as drawn (note) and shrinking is skipped unless TALLY_PROPERTY_SHRINK is set.
PHASES = [p for p in Phase if p is not Phase.shrink or os.environ.get("TALLY_PROPERTY_SHRINK")]


@given(schedules())
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("TALLY_PROPERTY_RANDOM"),
    suppress_health_check=list(HealthCheck),
    phases=PHASES,
)
def test_any_order_batching_and_consumers_end_in_the_models_state(migrated: str, schedule) -> None:
    history, plan = schedule
    note(f"history={history!r}")
    note(f"schedule={[([e['id'] for e in b], consumer, refold) for b, consumer, refold in plan]!r}")
    asyncio.run(_run(migrated, history, plan))


@pytest.mark.parametrize("order", ["delete first", "usage first"])
def test_late_usage_before_a_deletion_is_stale_either_way(migrated: str, order: str) -> None:
    """The probe's reproduction: usage at t-60 and a deletion at t-30 give no customer in
    either order (before: usage first → 404, delete first → 200 with the cost)."""
    usage = {
        "specversion": "1.0",
        "id": "u",
        "source": "gw",
        "type": "usage.recorded",
        "subject": "x",
        "environment": "prod",
        "time": (NOW - timedelta(minutes=60)).isoformat(),
        "data": {"cost": "3"},
    }
    delete = {
        **usage,
        "id": "d",
        "type": "customer.deleted",
        "time": (NOW - timedelta(minutes=30)).isoformat(),
        "data": {},
    }
    batches = [[delete], [usage]] if order == "delete first" else [[usage], [delete]]
    asyncio.run(_run(migrated, [usage, delete], [(b, 0, False) for b in batches]))
