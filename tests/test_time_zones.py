"""A date-time without a time zone names a different instant in every zone: everywhere tally
takes one — query parameters, bodies, the vendors' filter values, events over HTTP and over
AMQP — it is refused, naming the field, rather than guessed to be UTC. A bare date is a UTC
day (midnight UTC), as the usage series' days are."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from service.domain.events import InvalidEvent, Rejection, validate_event
from service.domain.profile import parse_instant
from tests.compatkit import FLEXPRICE_SEARCH, RESPAN_LIST
from tests.consumerkit import barrier, running_consumer
from tests.eventkit import Broker, usage
from tests.factories import Org, insert_customer
from tests.support import problem, uid

NAIVE = "2026-01-05T10:00:00"
ZONE = "time zone"


def test_a_date_is_midnight_utc_and_a_zone_is_kept() -> None:
    assert parse_instant("2026-01-05") == datetime(2026, 1, 5, tzinfo=UTC)
    assert parse_instant("2026-01-05T10:00:00Z") == datetime(2026, 1, 5, 10, tzinfo=UTC)
    assert parse_instant("2026-01-05T12:00:00+02:00") == datetime(2026, 1, 5, 10, tzinfo=UTC)
    for bad in (NAIVE, "2026-01-05 10:00", datetime(2026, 1, 5, 10)):
        with pytest.raises(ValueError, match=ZONE):
            parse_instant(bad)


@pytest.mark.parametrize(
    "param", ["first_seen_gte", "first_seen_lte", "last_active_gte", "last_active_lte"], ids=lambda p: p
)
async def test_list_filters_refuse_a_time_without_a_zone(client: TestClient, org: Org, param: str) -> None:
    resp = await client.get("/v1/customers", params={param: NAIVE}, headers=org.headers())
    body = await problem(resp, 400, param)
    assert ZONE in body["errors"][0]["detail"], body


async def test_a_body_date_time_without_a_zone_is_refused(client: TestClient, org: Org) -> None:
    who = uid()
    resp = await client.post(
        "/v1/customers", json={"customer_identifier": who, "last_purchase_date": NAIVE}, headers=org.headers()
    )
    await problem(resp, 400, "last_purchase_date")
    resp = await client.post(
        "/v1/customers",
        json={"customer_identifier": who, "last_purchase_date": NAIVE + "Z"},
        headers=org.headers(),
    )
    assert resp.status == 201, await resp.text()
    resp = await client.patch(f"/v1/customers/{who}", json={"last_purchase_date": NAIVE}, headers=org.headers())
    await problem(resp, 400, "last_purchase_date")


async def test_vendor_filters_refuse_a_time_without_a_zone(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    await insert_customer(pool, org, uid(), first_seen=datetime.now(UTC) - timedelta(days=1))
    resp = await client.post(
        RESPAN_LIST, json={"filters": {"first_seen": {"operator": "gte", "value": [NAIVE]}}}, headers=org.headers()
    )
    body = await problem(resp, 400)
    assert any(e["name"].startswith("filters.first_seen") and ZONE in e["detail"] for e in body["errors"]), body
    flexprice = {"x-api-key": org.key}
    await problem(await client.post(FLEXPRICE_SEARCH, json={"start_time": NAIVE}, headers=flexprice), 400, "start_time")
    cond = {"field": "created_at", "operator": "after", "data_type": "date", "value": {"date": NAIVE}}
    body = await problem(await client.post(FLEXPRICE_SEARCH, json={"filters": [cond]}, headers=flexprice), 400)
    assert any(e["name"].startswith("filters.0") and ZONE in e["detail"] for e in body["errors"]), body
    # A date alone is a UTC day, for the vendors' filters as for tally's.
    cond["value"] = {"date": "2025-01-02"}
    assert (await client.post(FLEXPRICE_SEARCH, json={"filters": [cond]}, headers=flexprice)).status == 200


def _naive(event: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    target = event
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = NAIVE
    return event


def _subscription(org: str) -> dict[str, Any]:
    event = usage(org, uid())
    event.update(
        type="subscription.upserted",
        data={"id": "sub_1", "status": "active", "current_period_start": "2026-01-01T00:00:00Z"},
    )
    return event


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (lambda org: usage(org, uid()), ("time",)),
        (_subscription, ("data", "current_period_start")),
    ],
    ids=["time", "data.current_period_start"],
)
async def test_events_refuse_a_time_without_a_zone(client: TestClient, org: Org, make: Any, path: tuple) -> None:
    event = _naive(make(org.name), path)
    with pytest.raises(InvalidEvent) as refused:
        validate_event(event, datetime.now(UTC))
    assert refused.value.code == Rejection.INVALID_FIELD and ZONE in refused.value.reason
    resp = await client.post("/v1/events", json=event, headers=org.headers())
    await problem(resp, 400, "event." + ".".join(path))
    resp = await client.post("/v1/events", json=[usage(org.name, uid()), event], headers=org.headers())
    await problem(resp, 400, "[1]." + ".".join(path))


async def test_an_amqp_event_without_a_zone_is_dead_lettered_naming_the_field(
    settings: Any, pool: asyncpg.Pool, broker: Broker, org: Org
) -> None:
    event = _naive(usage(org.name, uid()), ("time",))
    async with running_consumer(settings, pool, broker):
        await broker.publish(event)
        await barrier(pool, broker, org)
    [letter] = await broker.dead_letters(1)
    reason = letter.headers["x-tally-reason"]
    assert letter.headers["x-tally-reason-code"] == "invalid_field" and "time" in reason and ZONE in reason, reason
