"""Usage per model and provider: usage.recorded's data.model and data.provider, folded exactly
once into per-day, per-model sums (through the real consumer, with duplicates, redeliveries and
a crash between commit and ack; and after a late deletion), and the usage routes grouped by
model or provider or filtered by model — each checked against sums computed here from the
events published (not from tally's tables)."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import asyncpg
import orjson
import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from service.domain.events import MAX_MODEL_NAME, InvalidEvent, validate_event
from service.store import auth, failpoints
from service.store.usage import DEFAULT_TOP, GROUPED, MAX_TOP, OTHER
from tests.consumerkit import drained, running_consumer
from tests.eventkit import Broker, cloud_event, fold_events, usage, wait_until
from tests.factories import Org, make_org

# (model, provider): five models of three providers, some events naming neither, one a provider alone.
MODELS = [
    ("gpt-4o", "openai"),
    ("gpt-4o-mini", "openai"),
    ("claude-sonnet-4", "anthropic"),
    ("claude-haiku", "anthropic"),
    ("gemini-2.0-flash", "google"),
    (None, None),
    (None, "openai"),
]


def with_model(event: dict, model: str | None, provider: str | None) -> dict:
    if model is not None:
        event["data"]["model"] = model
    if provider is not None:
        event["data"]["provider"] = provider
    return event


def random_events(rng: random.Random, org: str, subjects: list[str], n: int, days: float = 20) -> list[dict]:
    return [
        with_model(
            usage(
                org,
                rng.choice(subjects),
                when=datetime.now(UTC) - timedelta(days=rng.uniform(0.01, days)),
                requests=rng.randint(1, 4),
                prompt=rng.randint(0, 200),
                completion=rng.randint(0, 100),
                cost=f"{rng.randint(0, 900) / 1000:.4f}",
                latency=rng.choice([None, round(rng.uniform(0.1, 3), 3)]),
            ),
            *rng.choice(MODELS),
        )
        for _ in range(n)
    ]


# ---- the oracle ----------------------------------------------------------------------------


def distinct(events: Iterable[dict]) -> list[dict]:
    """Each event once, by its dedupe key."""
    seen: dict[tuple[str, str, str, str], dict] = {}
    for e in events:
        seen.setdefault((e["organization"], e.get("environment", "prod"), e["source"], e["id"]), e)
    return list(seen.values())


def day_of(e: dict) -> date:
    return datetime.fromisoformat(e["time"]).astimezone(UTC).date()


def sums(events: Iterable[dict], key: Callable[[dict], object]) -> dict[object, tuple[int, int, Decimal]]:
    """(requests, total tokens, cost) per key, each distinct event once."""
    out: dict[object, list] = defaultdict(lambda: [0, 0, Decimal(0)])
    for e in distinct(events):
        d = e["data"]
        s = out[key(e)]
        s[0] += d["requests"]
        s[1] += d["prompt_tokens"] + d["completion_tokens"]
        s[2] += Decimal(d["cost"])
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def stored_key(e: dict) -> tuple[str, date, str, str] | None:
    """The daily_model_usage row an event adds to (None: it names neither model nor provider)."""
    model, provider = e["data"].get("model"), e["data"].get("provider")
    if model is None and provider is None:
        return None
    return (e["subject"], day_of(e), model or "", provider or "")


async def stored(pool: asyncpg.Pool, org: Org) -> dict[object, tuple[int, int, Decimal]]:
    rows = await pool.fetch(
        "SELECT c.customer_identifier, d.day, d.model, d.provider, d.requests, d.total_tokens, d.cost"
        " FROM daily_model_usage d JOIN customers c ON c.organization_id = d.organization_id AND c.id = d.customer_id"
        " WHERE d.organization_id = $1",
        org.id,
    )
    return {
        (r["customer_identifier"], r["day"], r["model"], r["provider"]): (r["requests"], r["total_tokens"], r["cost"])
        for r in rows
    }


def per_model(events: Iterable[dict]) -> dict[object, tuple[int, int, Decimal]]:
    return {k: v for k, v in sums(events, stored_key).items() if k is not None}


# ---- validation ----------------------------------------------------------------------------


def test_model_and_provider_are_trimmed_and_blank_is_absent() -> None:
    now = datetime.now(UTC)
    e = validate_event(with_model(usage("o", "s"), "  gpt-4o ", ""), now)
    assert (e.data.model, e.data.provider) == ("gpt-4o", None)  # type: ignore[union-attr]
    e = validate_event(with_model(usage("o", "s"), "   ", "bedrock"), now)
    assert (e.data.model, e.data.provider) == (None, "bedrock")  # type: ignore[union-attr]
    longest = "m" * MAX_MODEL_NAME
    assert validate_event(with_model(usage("o", "s"), longest, None), now).data.model == longest  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "m" * (MAX_MODEL_NAME + 1)),
        ("model", "gpt\n4o"),
        ("model", "a,b"),
        ("model", 4),
        ("provider", "open\x07ai"),
        ("provider", ["openai"]),
    ],
)
def test_a_bad_model_or_provider_rejects_the_event_naming_the_field(field: str, value: object) -> None:
    raw = usage("o", "s")
    raw["data"][field] = value
    with pytest.raises(InvalidEvent) as caught:
        validate_event(raw, datetime.now(UTC))
    assert caught.value.code == "invalid_field"
    assert [f.path for f in caught.value.fields] == [f"data.{field}"]


async def test_http_ingest_refuses_a_bad_model_naming_it(client: TestClient, org: Org) -> None:
    events = [usage(org.name, "m_http"), with_model(usage(org.name, "m_http"), "x" * 65, None)]
    r = await client.post("/v1/events", json=events, headers=org.headers())
    assert r.status == 400, await r.text()
    names = {e["name"] for e in (await r.json())["errors"]}
    assert any(n.endswith("data.model") for n in names), names


# ---- folding: exactly once, in any order --------------------------------------------------


async def test_per_model_sums_through_the_consumer_exactly_once(settings, pool, broker: Broker, org: Org) -> None:
    """Duplicates as new messages, a batch published twice, a crash between commit and ack:
    every (customer, day, model, provider) holds the sums of its distinct events."""
    rng = random.Random(5)
    events = random_events(rng, org.name, [f"mc_{i}" for i in range(5)], 300)
    crashed = asyncio.Event()

    async def crash_once() -> None:
        if not crashed.is_set():
            crashed.set()
            raise ConnectionError("simulated crash after commit")

    want = per_model(events)
    with failpoints.arm("consumer.after_commit", crash_once):
        async with running_consumer(settings, pool, broker):
            for start in range(0, len(events), 50):
                await broker.publish(events[start : start + 50])
            for e in rng.sample(events, 40):
                await broker.publish(e)
            await broker.publish(events[100:160])

            async def done() -> bool:
                return await stored(pool, org) == want and await drained(broker)

            await wait_until(done, what="per-model sums as the oracle's")
    assert crashed.is_set()
    assert await stored(pool, org) == want
    # Every event's usage is in daily_usage once: the per-model rows are a part of it.
    daily = await pool.fetchrow(
        "SELECT sum(requests) AS requests, sum(cost) AS cost FROM daily_usage WHERE organization_id = $1", org.id
    )
    assert (daily["requests"], daily["cost"]) == sums(events, lambda e: None)[None][::2]


async def test_a_late_deletion_rebuilds_the_per_model_rows(pool: asyncpg.Pool, org: Org) -> None:
    """Usage before and after a deletion that arrives last: the per-model rows keep exactly the
    usage after it, and summed over models they are the daily rows."""
    rng = random.Random(9)
    tombstone = datetime.now(UTC) - timedelta(days=5, hours=3)
    events = [e for e in random_events(rng, org.name, ["late_a", "late_b"], 120, days=10) if e["data"].get("model")]
    deletion = cloud_event(org.name, "late_a", "customer.deleted", {}, when=tombstone)
    async with pool.acquire() as conn:
        for start in range(0, len(events), 40):
            assert set(await fold_events(conn, *events[start : start + 40])) == {"applied"}
        assert await fold_events(conn, deletion) == ["applied"]
    live = [e for e in events if e["subject"] != "late_a" or datetime.fromisoformat(e["time"]) > tombstone]
    assert len(live) < len(events)
    assert await stored(pool, org) == per_model(live)
    mismatched = await pool.fetch(
        """
        SELECT d.customer_id, d.day FROM daily_usage d
        FULL JOIN (SELECT organization_id, customer_id, day, sum(requests) AS requests, sum(cost) AS cost,
                          sum(total_tokens) AS total_tokens, sum(latency_count) AS latency_count
                   FROM daily_model_usage WHERE organization_id = $1 GROUP BY 1, 2, 3) m
               ON m.organization_id = d.organization_id AND m.customer_id = d.customer_id AND m.day = d.day
        WHERE coalesce(d.organization_id, m.organization_id) = $1
          AND (d.requests, d.cost, d.total_tokens, d.latency_count)
              IS DISTINCT FROM (m.requests, m.cost, m.total_tokens, m.latency_count)
        """,
        org.id,
    )
    assert mismatched == []


async def test_per_model_rows_are_the_organizations_local_days(client: TestClient, pool: asyncpg.Pool) -> None:
    """In a reporting time zone the per-model rows fall on the zone's days, as the daily rows do,
    before and after a late deletion's rebuild; the API's grouped report shows those days."""
    org = await make_org(pool)
    zone = "Pacific/Kiritimati"  # UTC+14: most instants fall on another local day than their UTC one
    async with pool.acquire() as conn:
        await auth.set_time_zone(conn, org.name, zone)
    rng = random.Random(23)
    events = [with_model(e, "gpt-4o", "openai") for e in random_events(rng, org.name, ["tz_a"], 60, days=12)]
    cut = datetime.now(UTC) - timedelta(days=6)
    local = ZoneInfo(zone)

    def local_day(e: dict) -> date:
        return datetime.fromisoformat(e["time"]).astimezone(local).date()

    async with pool.acquire() as conn:
        assert set(await fold_events(conn, *events)) == {"applied"}
        assert await stored(pool, org) == sums(events, lambda e: ("tz_a", local_day(e), "gpt-4o", "openai"))
        assert await fold_events(conn, cloud_event(org.name, "tz_a", "customer.deleted", {}, when=cut)) == ["applied"]
    after = [e for e in events if datetime.fromisoformat(e["time"]) > cut]
    want = sums(after, lambda e: ("tz_a", local_day(e), "gpt-4o", "openai"))
    assert await stored(pool, org) == want
    end = datetime.now(local).date()
    r = await client.get(
        f"/v1/customers/tz_a/usage?from={end - timedelta(days=13)}&to={end}&group_by=model", headers=org.headers()
    )
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["time_zone"] == zone
    assert got_rows(body, "model") == {(day, "gpt-4o"): v for (_, day, _, _), v in want.items()}


async def test_a_deleted_customer_leaves_no_per_model_rows(client: TestClient, pool: asyncpg.Pool, org: Org) -> None:
    async with pool.acquire() as conn:
        await fold_events(conn, with_model(usage(org.name, "gone"), "gpt-4o", "openai"))
    assert (await client.delete("/v1/customers/gone", headers=org.headers())).status == 204
    assert await pool.fetchval("SELECT count(*) FROM daily_model_usage WHERE organization_id = $1", org.id) == 0


async def test_a_batch_without_models_runs_no_per_model_statement(pool: asyncpg.Pool, org: Org) -> None:
    statements: list[str] = []

    def log(record: asyncpg.connection.LoggedQuery) -> None:
        statements.append(record.query)

    async with pool.acquire() as conn:
        conn.add_query_logger(log)
        try:
            assert await fold_events(conn, usage(org.name, "plain"), usage(org.name, "plain")) == ["applied"] * 2
            plain = len(statements)
            named = with_model(usage(org.name, "plain"), "gpt-4o", None)
            assert await fold_events(conn, named) == ["applied"]
        finally:
            conn.remove_query_logger(log)
    assert plain and not any("daily_model_usage" in q for q in statements[:plain])
    assert sum("daily_model_usage" in q for q in statements[plain:]) == 1
    assert await pool.fetchval("SELECT count(*) FROM daily_model_usage WHERE organization_id = $1", org.id) == 1


# ---- the routes ------------------------------------------------------------------------------


@pytest.fixture
async def folded(pool: asyncpg.Pool, org: Org, other_org: Org) -> list[dict]:
    """Usage of 6 customers over the last 33 days (the retention is 35), with models; and another organization's."""
    rng = random.Random(17)
    events = random_events(rng, org.name, [f"rm_{i}" for i in range(6)], 400, days=33)
    noise = [with_model(usage(other_org.name, "rm_0", cost="9.0000"), "secret-model", "openai") for _ in range(3)]
    async with pool.acquire() as conn:
        for start in range(0, len(events), 100):
            assert set(await fold_events(conn, *events[start : start + 100])) == {"applied"}
        assert set(await fold_events(conn, *noise)) == {"applied"}
    return events


def bucket_of(granularity: str) -> Callable[[date], date]:
    if granularity == "week":
        return lambda d: d - timedelta(days=d.weekday())
    if granularity == "month":
        return lambda d: d.replace(day=1)
    return lambda d: d


def grouped_oracle(
    events: list[dict], start: date, end: date, granularity: str, dimension: str, top: int
) -> dict[tuple[date, str | None], tuple[int, int, Decimal]]:
    """Per bucket and name: the top names by cost over the range (then requests, then name),
    the rest as other, usage naming none under None."""
    inside = [e for e in events if start <= day_of(e) <= end]
    totals = sums(inside, lambda e: e["data"].get(dimension))
    ranked = sorted(
        (n for n in totals if n is not None and n != OTHER), key=lambda n: (-totals[n][2], -totals[n][0], n)
    )
    kept = set(ranked[:top])
    bucket = bucket_of(granularity)

    def key(e: dict) -> tuple[date, str | None]:
        name = e["data"].get(dimension)
        return bucket(day_of(e)), None if name is None else name if name in kept else OTHER

    return sums(inside, key)


def got_rows(body: dict, dimension: str) -> dict[tuple[date, str | None], tuple[int, int, Decimal]]:
    out = {}
    for p in body["results"]:
        key = (date.fromisoformat(p["start"]), p[dimension])
        assert key not in out, key
        out[key] = (p["requests"], p["total_tokens"], Decimal(p["cost"]))
    return out


@pytest.mark.parametrize(
    ("dimension", "granularity", "top"),
    [("model", "day", None), ("model", "week", 2), ("provider", "month", None), ("provider", "week", 1)],
)
async def test_customer_series_grouped_by_model_or_provider(
    client: TestClient, org: Org, folded: list[dict], dimension: str, granularity: str, top: int | None
) -> None:
    end = datetime.now(UTC).date()
    start = end - timedelta(days=34)
    url = f"/v1/customers/rm_1/usage?from={start}&to={end}&granularity={granularity}&group_by={dimension}"
    r = await client.get(url + (f"&top={top}" if top else ""), headers=org.headers())
    assert r.status == 200, await r.text()
    body = await r.json()
    assert body["group_by"] == dimension
    mine = [e for e in folded if e["subject"] == "rm_1"]
    want = grouped_oracle(mine, start, end, granularity, dimension, top or DEFAULT_TOP)
    assert got_rows(body, dimension) == want
    if top:
        assert any(name == OTHER for _, name in want), "the top should leave some out"
    starts = [p["start"] for p in body["results"]]
    assert starts == sorted(starts)


async def test_organization_report_grouped_by_model_and_filtered(
    client: TestClient, org: Org, other_org: Org, folded: list[dict]
) -> None:
    end = datetime.now(UTC).date()
    start = end - timedelta(days=20)
    h = org.headers()
    r = await client.get(f"/v1/usage?from={start}&to={end}&group_by=model&top=3", headers=h)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert got_rows(body, "model") == grouped_oracle(folded, start, end, "day", "model", 3)
    assert "secret-model" not in {p["model"] for p in body["results"]}  # another organization's
    # Filtered by customers and by models, grouped by provider.
    chosen = ("gpt-4o", "claude-haiku")
    r = await client.get(
        f"/v1/usage?from={start}&to={end}&granularity=week&group_by=provider"
        f"&customer_identifiers=rm_2,rm_3&model={chosen[0]}&model={chosen[1]}",
        headers=h,
    )
    assert r.status == 200, await r.text()
    subset = [e for e in folded if e["subject"] in ("rm_2", "rm_3") and e["data"].get("model") in chosen]
    assert got_rows(await r.json(), "provider") == grouped_oracle(subset, start, end, "week", "provider", DEFAULT_TOP)
    # Totals of one model, zero-filled.
    r = await client.get(f"/v1/usage?from={start}&to={end}&model=gpt-4o", headers=h)
    body = await r.json()
    assert len(body["results"]) == 21
    want = sums([e for e in folded if e["data"].get("model") == "gpt-4o" and start <= day_of(e) <= end], day_of)
    got = {
        date.fromisoformat(p["start"]): (p["requests"], p["total_tokens"], Decimal(p["cost"]))
        for p in body["results"]
        if p["requests"]
    }
    assert got == want
    # The other organization sees only its own model.
    r = await client.get(f"/v1/usage?from={start}&to={end}&group_by=model", headers=other_org.headers())
    assert {p["model"] for p in (await r.json())["results"]} == {"secret-model"}


async def test_by_customer_pages_of_one_model(client: TestClient, org: Org, folded: list[dict]) -> None:
    end = datetime.now(UTC).date()
    start = end - timedelta(days=30)
    seen: dict[tuple[str, date], tuple[int, int, Decimal]] = {}
    after = None
    for _ in range(10):
        url = f"/v1/usage?from={start}&to={end}&group_by=customer&model=claude-sonnet-4&limit=2"
        r = await client.get(url + (f"&after={after}" if after else ""), headers=org.headers())
        assert r.status == 200, await r.text()
        body = await r.json()
        for p in body["results"]:
            key = (p["customer_identifier"], date.fromisoformat(p["start"]))
            assert key not in seen
            seen[key] = (p["requests"], p["total_tokens"], Decimal(p["cost"]))
        after = body["next_after"]
        if after is None:
            break
    chosen = [e for e in folded if e["data"].get("model") == "claude-sonnet-4" and start <= day_of(e) <= end]
    assert seen == sums(chosen, lambda e: (e["subject"], day_of(e)))


async def test_customer_series_of_a_model_is_zero_filled(client: TestClient, org: Org, folded: list[dict]) -> None:
    end = datetime.now(UTC).date()
    start = end - timedelta(days=9)
    r = await client.get(f"/v1/customers/rm_4/usage?from={start}&to={end}&model=gpt-4o-mini", headers=org.headers())
    assert r.status == 200, await r.text()
    body = await r.json()
    assert len(body["results"]) == 10 and body["group_by"] is None
    chosen = [e for e in folded if e["subject"] == "rm_4" and e["data"].get("model") == "gpt-4o-mini"]
    want = sums([e for e in chosen if start <= day_of(e) <= end], day_of)
    got = {
        date.fromisoformat(p["start"]): (p["requests"], p["total_tokens"], Decimal(p["cost"]))
        for p in body["results"]
        if p["requests"]
    }
    assert got == want


@pytest.mark.parametrize(
    ("path", "query", "name"),
    [
        ("/v1/usage", "group_by=vendor", "group_by"),
        ("/v1/usage", "group_by=model&top=0", "top"),
        ("/v1/usage", f"group_by=model&top={MAX_TOP + 1}", "top"),
        ("/v1/usage", "top=3", "top"),
        ("/v1/usage", "group_by=customer&top=3", "top"),
        ("/v1/usage", "group_by=model&limit=5", "limit"),
        ("/v1/usage", f"model={'m' * (MAX_MODEL_NAME + 1)}", "model"),
        ("/v1/usage", "model=" + ",".join(f"m{i}" for i in range(101)), "model"),
        ("/v1/usage", "model=bad%01name", "model"),
        ("/v1/customers/rm_0/usage", "group_by=customer", "group_by"),
        ("/v1/customers/rm_0/usage", "top=2", "top"),
        ("/v1/customers/rm_0/usage", "group_by=provider&top=x", "top"),
        ("/v1/customers/rm_0/usage", f"model={'m' * (MAX_MODEL_NAME + 1)}", "model"),
    ],
)
async def test_bad_parameters_are_400s_naming_them(
    client: TestClient, org: Org, path: str, query: str, name: str
) -> None:
    r = await client.get(f"{path}?{query}", headers=org.headers())
    assert r.status == 400, await r.text()
    assert name in {e["name"] for e in (await r.json())["errors"]}


async def test_another_organizations_customer_is_404_grouped_too(
    client: TestClient, org: Org, other_org: Org, folded: list[dict]
) -> None:
    r = await client.get("/v1/customers/rm_1/usage?group_by=model", headers=other_org.headers())
    assert r.status == 404
    # Both have an rm_0: each sees its own models only.
    r = await client.get("/v1/customers/rm_0/usage?group_by=model", headers=other_org.headers())
    assert {p["model"] for p in (await r.json())["results"]} == {"secret-model"}
    r = await client.get("/v1/customers/rm_0/usage?from=2026-01-01&group_by=model", headers=org.headers())
    assert "secret-model" not in {p["model"] for p in (await r.json())["results"]}


# ---- plans -----------------------------------------------------------------------------------

LOAD_MODEL_DAYS = """
WITH made AS (
    INSERT INTO customers (organization_id, environment, customer_identifier)
    SELECT $1, 'prod', 'plan_' || g FROM generate_series(1, $2) g
    RETURNING organization_id, id
)
INSERT INTO daily_model_usage (organization_id, customer_id, day, model, provider, requests, cost)
SELECT m.organization_id, m.id, current_date - d, 'model-' || k, 'p', 1, 0.01
FROM made m, generate_series(0, 29) d, generate_series(1, 3) k
"""


def scans(node: dict, out: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if node.get("Relation Name") in ("daily_model_usage", "daily_usage"):
        out.append((node["Relation Name"], node["Node Type"]))
    for child in node.get("Plans", []):
        scans(child, out)
    return out


@pytest.mark.parametrize("dimension", ["model", "provider"])
async def test_one_customers_rows_are_read_by_their_primary_key(pool: asyncpg.Pool, org: Org, dimension: str) -> None:
    """A customer's (or a few customers') per-model rows are a range of the primary key, also
    on a table loaded in bulk and not analyzed since."""
    end = datetime.now(UTC).date()
    async with pool.acquire() as conn:
        await conn.execute(LOAD_MODEL_DAYS, org.id, 3000)
        for identifiers, models in ((["plan_7"], None), (["plan_7", "plan_8"], ["model-1"])):
            args = [org.id, "prod", end - timedelta(days=6), end, "day", identifiers, models, DEFAULT_TOP]
            doc = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {GROUPED[dimension]}", *args)
            plan = (orjson.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]
            found = scans(plan, [])
            assert ("daily_model_usage", "Seq Scan") not in found and ("daily_usage", "Seq Scan") not in found, found
            assert any(table == "daily_model_usage" for table, _ in found), found


# ---- the customer list -----------------------------------------------------------------------


async def test_the_list_in_a_window_filters_by_a_model_used_in_it(
    client: TestClient, org: Org, folded: list[dict]
) -> None:
    end = datetime.now(UTC).date()
    start = end - timedelta(days=2)
    inside = [e for e in folded if start <= day_of(e) <= end]
    for models in (["gemini-2.0-flash"], ["claude-haiku", "gpt-4o"]):
        want = {e["subject"] for e in inside if e["data"].get("model") in models}
        window = sums([e for e in inside if e["subject"] in want], lambda e: e["subject"])
        url = f"/v1/customers?usage_from={start}&usage_to={end}&model={','.join(models)}&limit=2&sort_by=-total_cost"
        got: dict[str, Decimal] = {}
        count = None
        while url:
            r = await client.get(url, headers=org.headers())
            assert r.status == 200, await r.text()
            body = await r.json()
            count = body["count"]
            got.update({c["customer_identifier"]: Decimal(c["total_cost"]) for c in body["results"]})
            url = body["next"] and str(URL(body["next"]).relative())
        assert count == len(want) and set(got) == want
        assert got == {who: s[2] for who, s in window.items()}  # the window's whole cost, every model's
    r = await client.get("/v1/customers?model=gpt-4o", headers=org.headers())
    assert r.status == 400
    assert [e["name"] for e in (await r.json())["errors"]] == ["model"]
