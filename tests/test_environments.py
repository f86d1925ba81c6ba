"""prod and test are separate worlds: an event is deduplicated within its own environment, and
a key reaches its own environment only (as live and test keys do at the payment providers) —
naming the other one is a 403 that names the parameter and the key's environment."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from aiohttp.test_utils import TestClient

from service.domain.events import validate_event
from service.store.fold import fold
from tests.factories import Org
from tests.support import ok_json, problem, uid

RETENTION = timedelta(days=35)


def usage_event(org: Org, subject: str, environment: str, requests: int, cost: str, event_id: str) -> dict:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "gw",
        "type": "usage.recorded",
        "time": (datetime.now(UTC) - timedelta(seconds=1)).isoformat(),
        "subject": subject,
        "organization": org.name,
        "environment": environment,
        "data": {"requests": requests, "cost": cost},
    }


async def usage_of(pool: asyncpg.Pool, org: Org, environment: str, subject: str) -> tuple[int, Decimal] | None:
    row = await pool.fetchrow(
        "SELECT number_of_requests, total_cost FROM customer_rows"
        " WHERE organization_id = $1 AND environment = $2 AND customer_identifier = $3",
        org.id,
        environment,
        subject,
    )
    return (row["number_of_requests"], row["total_cost"]) if row else None


async def test_the_same_source_and_id_in_two_environments_both_apply(pool: asyncpg.Pool, org: Org) -> None:
    subject, event_id = uid(), f"dup-env-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    test_event = validate_event(usage_event(org, subject, "test", 1, "1", event_id), now)
    prod_event = validate_event(usage_event(org, subject, "prod", 5, "100", event_id), now)
    async with pool.acquire() as conn:
        first = await fold(conn, [test_event], retention=RETENTION)
        second = await fold(conn, [prod_event], retention=RETENTION)
        # Within one environment the pair is still a duplicate, in a batch or later.
        again = await fold(conn, [prod_event, test_event], retention=RETENTION)
    assert [o.status for o in first.outcomes + second.outcomes] == ["applied", "applied"]
    assert [o.status for o in again.outcomes] == ["duplicate", "duplicate"]
    assert await usage_of(pool, org, "prod", subject) == (5, Decimal("100"))
    assert await usage_of(pool, org, "test", subject) == (1, Decimal("1"))


async def test_a_batch_holding_both_environments_applies_both(pool: asyncpg.Pool, org: Org) -> None:
    subject, event_id = uid(), f"dup-env-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    events = [
        validate_event(usage_event(org, subject, environment, 2, "3", event_id), now)
        for environment in ("test", "prod")
    ]
    async with pool.acquire() as conn:
        result = await fold(conn, events, retention=RETENTION)
    assert [o.status for o in result.outcomes] == ["applied", "applied"]
    assert await usage_of(pool, org, "prod", subject) == await usage_of(pool, org, "test", subject) == (2, Decimal(3))


async def test_events_sent_with_a_key_are_its_environments(client: TestClient, org: Org) -> None:
    event = usage_event(org, uid(), "prod", 1, "1", uuid.uuid4().hex)
    # Omitted, the environment is the key's.
    omitted = {k: v for k, v in event.items() if k not in ("environment", "organization")}
    await ok_json(await client.post("/v1/events", json=omitted, headers=org.headers(org.test_key)), 202)
    # Another one is a 403 naming each such event; nothing is published.
    batch = [usage_event(org, uid(), "test", 1, "1", uuid.uuid4().hex), event]
    resp = await client.post("/v1/events", json=batch, headers=org.headers(org.test_key))
    body = await problem(resp, 403, "[1].environment")
    assert [e["name"] for e in body["errors"]] == ["[1].environment"]
    assert "'test'" in body["detail"]
    single = await client.post("/v1/events", json=event, headers=org.headers(org.test_key))
    await problem(single, 403, "event.environment")
    await ok_json(await client.post("/v1/events", json=event, headers=org.headers()), 202)


async def test_a_key_reaches_its_own_environment_only(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    """Every canonical and Respan route that takes an environment: the other one is a 403
    naming the parameter and the key's environment (never data of the other environment)."""
    ident = uid()
    await ok_json(
        await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers(org.test_key)), 201
    )
    routes = [
        ("GET", "/v1/customers?environment=prod"),
        ("GET", f"/v1/customers/{ident}?environment=prod"),
        ("PATCH", f"/v1/customers/{ident}?environment=prod"),
        ("DELETE", f"/v1/customers/{ident}?environment=prod"),
        ("GET", f"/v1/customers/{ident}/usage?environment=prod"),
        ("GET", "/compat/respan/api/users/list/?environment=prod"),
        ("POST", "/compat/respan/api/users/list/?environment=prod"),
        ("GET", f"/compat/respan/api/users/{ident}/?environment=prod"),
        ("PATCH", f"/compat/respan/api/users/{ident}/?environment=prod"),
        ("DELETE", f"/compat/respan/api/users/{ident}/?environment=prod"),
    ]
    for method, path in routes:
        body = {"name": "x"} if method == "PATCH" else None
        resp = await client.request(method, path, json=body, headers=org.headers(org.test_key))
        problem_body = await problem(resp, 403, "environment")
        assert "'test'" in problem_body["detail"], (method, path)
    create = {"customer_identifier": uid(), "environment": "prod"}
    await problem(await client.post("/v1/customers", json=create, headers=org.headers(org.test_key)), 403)
    # The customer is untouched, and naming the key's own environment works everywhere.
    doc = await ok_json(await client.get(f"/v1/customers/{ident}?environment=test", headers=org.headers(org.test_key)))
    assert doc["name"] is None and doc["environment"] == "test"
