"""What a newcomer meets in the first hour: errors that say what to do, dates and
emails taken as documented, one JSON style on every route."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.support import ok_json, problem, uid


async def test_a_minimal_event_lists_every_missing_field(client: TestClient, org: Any) -> None:
    body = await problem(await client.post("/v1/events", json={"type": "usage.recorded"}, headers=org.headers()), 400)
    named = {e["name"] for e in body["errors"]}
    assert {"event.specversion", "event.id", "event.source", "event.time", "event.subject"} <= named, named


async def test_every_event_of_a_batch_is_named_by_its_index(client: TestClient, org: Any) -> None:
    good = {
        "specversion": "1.0",
        "id": uid("e"),
        "source": "s",
        "type": "usage.recorded",
        "time": datetime.now(UTC).isoformat(),
        "subject": "x",
    }
    batch = [good, {**good, "id": uid("e"), "data": {"requests": -1, "cost": "x"}}, {**good, "subject": ""}]
    body = await problem(await client.post("/v1/events", json=batch, headers=org.headers()), 400)
    named = {e["name"] for e in body["errors"]}
    assert {"[1].data.requests", "[1].data.cost", "[2].subject"} <= named, named
    assert not any(name.startswith("[0]") for name in named)


async def test_a_bad_sort_field_is_named_with_where_to_look(client: TestClient, org: Any) -> None:
    body = await problem(await client.get("/v1/customers", params={"sort_by": "-nope"}, headers=org.headers()), 400)
    [error] = body["errors"]
    assert error["name"] == "sort_by" and "'-nope'" in error["detail"] and "/docs" in error["detail"]
    assert len(error["detail"]) < 150  # not all 36 values


@pytest.mark.parametrize("value", ["2026-11-21", "2026-11-21T10:00:00Z", "2026-11-21T10:00:00+01:00"])
async def test_dates_are_taken_as_the_message_says(client: TestClient, org: Any, value: str) -> None:
    await ok_json(await client.get("/v1/customers", params={"first_seen_gte": value}, headers=org.headers()))


async def test_a_word_for_a_date_says_what_is_accepted(client: TestClient, org: Any) -> None:
    r = await client.get("/v1/customers", params={"first_seen_gte": "yesterday"}, headers=org.headers())
    body = await problem(r, 400, "first_seen_gte")
    assert "2026-11-21" in body["errors"][0]["detail"]  # the example of a date the message offers


@pytest.mark.parametrize("method", ["PATCH", "POST"])
async def test_emails_are_validated(client: TestClient, org: Any, method: str) -> None:
    ident = uid()
    if method == "PATCH":
        await ok_json(
            await client.post("/v1/customers", json={"customer_identifier": ident}, headers=org.headers()), 201
        )
        r = await client.patch(f"/v1/customers/{ident}", json={"email": "not-an-email"}, headers=org.headers())
    else:
        r = await client.post(
            "/v1/customers", json={"customer_identifier": ident, "email": "a@b"}, headers=org.headers()
        )
    await problem(r, 400, "email")


async def test_a_wrong_method_names_the_allowed_ones(client: TestClient, org: Any) -> None:
    body = await problem(await client.put("/v1/customers", headers=org.headers()), 405)
    assert body["detail"] == "PUT is not allowed on /v1/customers; allowed: GET, POST"


async def test_one_json_style_on_every_route(client: TestClient, pool: Any, org: Any) -> None:
    """Compact JSON everywhere (PostgreSQL renders customers with row_to_json, Python with
    orjson), whatever builds the body."""
    ident = uid()
    created = await client.post(
        "/v1/customers", json={"customer_identifier": ident, "name": "A"}, headers=org.headers()
    )
    bodies = [await created.read()]
    for path in (
        "/v1/customers",
        f"/v1/customers/{ident}",
        f"/v1/customers/{ident}?include=subscriptions",
        f"/v1/customers/{ident}/usage",
        "/compat/respan/api/users/list/",
        "/compat/v0/api/v0/customers",
        "/compat/flexprice/v1/customers",
        "/compat/public/api/public/customers?include_subscriptions=true",
        "/healthz",
    ):
        r = await client.get(path, headers=org.headers())
        assert r.status == 200, (path, await r.text())
        bodies.append(await r.read())
    since = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    event = {
        "specversion": "1.0",
        "id": uid("e"),
        "source": "s",
        "type": "customer.deleted",
        "time": since,
        "subject": uid(),
    }
    bodies.append(await (await client.post("/v1/events", json=event, headers=org.headers())).read())
    for body in bodies:
        assert b'" : ' not in body and b'": ' not in body and b", " not in body, body[:300]
