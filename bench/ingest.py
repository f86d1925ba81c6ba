"""Ingest benchmark: the same events through (a) a bare consumer that only decodes and acks,
(b) a naive consumer that runs one transaction per event, (c) tally's fold called directly
on the events in memory (the database's share), (d) tally's consumer process, and (e) the
database's ceiling: the same events as batched dedupe plus upserts of per-customer and
per-customer-day sums into narrow tables with only their primary keys, and (e2) the same with
one index per usage sort field on the per-customer table (what any store that pages every
sort by index must maintain); then freshness at a
steady publish rate (publish to visible in GET /v1/customers/{id}; the load published by a
process of its own, probes ten a second from this one).

    python bench/ingest.py [--events 200000] [--batch 1] [--profile zipf|spread] [--json …]
    python bench/ingest.py --batch 100 --scale 1,2,4     # tally with 1, 2, 4 consumer processes
    python bench/ingest.py --backlog 1000000              # a consumer's peak RSS on a backlog
    python bench/ingest.py --batch 100 --models 5         # the same events with and without a model

Activity: ``zipf`` (a few customers very active: many events per customer in a batch) or
``spread`` (evenly over the customers: a batch touches mostly distinct customers). (d) is
done when the database holds every event's sums, not when the consumer says so.
Everything runs against a fresh database and private broker namespaces, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from queue import Empty
from typing import Any, TypeVar

import aio_pika
import aiohttp
import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    UNLIMITED,
    Rate,
    free_port,
    machine,
    percentile,
    print_table,
    start_tally,
    wait_ready,
    with_database,
    write_json,
)
from service.domain.events import validate_event  # noqa: E402
from service.infra.broker import Names, declare  # noqa: E402
from service.infra.migrate import migrate  # noqa: E402
from service.store import auth  # noqa: E402
from service.store.fold import fold  # noqa: E402

T = TypeVar("T")
AMQP_URL = os.environ.get("TALLY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RETENTION = timedelta(days=35)


def generate(org: str, n: int, customers: int, seed: int, profile: str = "zipf") -> list[dict]:
    """n usage events over ``customers`` customers, 20 days of history; Zipf-like activity or
    spread evenly over the customers."""
    rng = random.Random(seed)
    now = datetime.now(UTC) - timedelta(minutes=1)
    if profile == "zipf":
        weights = [1 / (rank + 1) ** 1.1 for rank in range(customers)]
        who = rng.choices(range(customers), weights=weights, k=n)
    else:
        who = [rng.randrange(customers) for _ in range(n)]
    return [
        {
            "specversion": "1.0",
            "id": f"e{seed}-{i}",
            "source": "bench",
            "type": "usage.recorded",
            "time": (now - timedelta(seconds=rng.random() * 20 * 86400)).isoformat(),
            "subject": f"user_{c}",
            "organization": org,
            "data": {
                "requests": 1,
                "prompt_tokens": rng.randint(10, 2000),
                "completion_tokens": rng.randint(5, 800),
                "cost": f"{rng.random() / 100:.6f}",
                "latency": round(rng.random() * 3, 3),
                "ttft": round(rng.random(), 3),
            },
        }
        for i, c in enumerate(who)
    ]


# Model names and their providers for --models: a gateway's usual mix.
MODELS = (
    ("gpt-4o", "openai"),
    ("gpt-4o-mini", "openai"),
    ("claude-sonnet-4", "anthropic"),
    ("claude-haiku-3.5", "anthropic"),
    ("gemini-2.0-flash", "google"),
    ("llama-3.3-70b", "groq"),
    ("mistral-large", "mistral"),
    ("deepseek-v3", "deepseek"),
)


def with_models(events: list[dict], org: str, n: int, seed: int) -> list[dict]:
    """The same events, for ``org``, each naming one of ``n`` models and its provider."""
    rng = random.Random(seed)
    names = [MODELS[i % len(MODELS)] for i in range(n)]
    named = []
    for e in events:
        model, provider = names[rng.randrange(n)]
        named.append({**e, "organization": org, "data": {**e["data"], "model": model, "provider": provider}})
    return named


def bodies(events: list[dict], per_message: int) -> list[bytes]:
    if per_message == 1:
        return [orjson.dumps(e) for e in events]
    return [orjson.dumps(events[i : i + per_message]) for i in range(0, len(events), per_message)]


async def preload(names: Names, messages: list[bytes], label: str) -> None:
    """Publish with confirms, many in flight at once, before any consumer starts."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(connection, channel, names)
        window = 2000
        for start in range(0, len(messages), window):
            await asyncio.gather(
                *(
                    topology.events.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key="usage.recorded",
                    )
                    for body in messages[start : start + window]
                )
            )
            print(
                f"\rpreloading {label}: {min(start + window, len(messages)):,}/{len(messages):,} messages",
                end="",
                file=sys.stderr,
                flush=True,
            )
        print(file=sys.stderr)
    finally:
        await connection.close()


async def delete_namespace(names: Names) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for queue in names.queues:
            await channel.queue_delete(queue)
        for exchange in names.exchanges:
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def bare_consumer(names: Names, n_events: int, prefetch: int) -> Rate:
    """(a) decode each message and ack it: the broker and client library's own limit."""
    connection = await aio_pika.connect(AMQP_URL)
    seen = 0
    done = asyncio.Event()
    first: float | None = None
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(names.ingest, passive=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen, first
            first = first or time.perf_counter()
            decoded = orjson.loads(message.body)
            seen += len(decoded) if isinstance(decoded, list) else 1
            await message.ack()
            if seen >= n_events:
                done.set()

        await queue.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - (first or time.perf_counter())
    finally:
        await connection.close()
    return Rate(n_events / elapsed)


async def naive_consumer(names: Names, dsn: str, n_events: int) -> Rate:
    """(b) one database transaction per event (tally's fold with batches of one), then ack."""
    connection = await aio_pika.connect(AMQP_URL)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    seen = 0
    done = asyncio.Event()
    first: float | None = None
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        queue = await channel.declare_queue(names.ingest, passive=True)
        lock = asyncio.Lock()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen, first
            first = first or time.perf_counter()
            decoded = orjson.loads(message.body)
            now = datetime.now(UTC)
            async with lock, pool.acquire() as conn:
                for raw in decoded if isinstance(decoded, list) else [decoded]:
                    await fold(conn, [validate_event(raw, now)], retention=RETENTION)
                    seen += 1
            await message.ack()
            if seen >= n_events:
                done.set()

        await queue.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - (first or time.perf_counter())
    finally:
        await connection.close()
        await pool.close()
    return Rate(n_events / elapsed)


async def fold_direct(dsn: str, events: list[dict], batch_size: int) -> Rate:
    """(c) the fold alone: validated events in memory, one transaction per batch."""
    now = datetime.now(UTC)
    validated = [validate_event(e, now) for e in events]
    conn = await asyncpg.connect(dsn, server_settings={"timezone": "UTC"})
    try:
        started = time.perf_counter()
        for i in range(0, len(validated), batch_size):
            await fold(conn, validated[i : i + batch_size], retention=RETENTION)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return Rate(len(events) / elapsed)


CEILING_SCHEMA = """
CREATE TABLE IF NOT EXISTS {t}_dedupe (org uuid, source text, id text, PRIMARY KEY (org, source, id));
CREATE TABLE IF NOT EXISTS {t}_customers (
    org uuid, customer text, requests bigint, prompt bigint, completion bigint, total bigint, cost numeric,
    latency_sum float8, latency_count bigint, ttft_sum float8, ttft_count bigint, first_seen timestamptz,
    last_active timestamptz, PRIMARY KEY (org, customer));
CREATE TABLE IF NOT EXISTS {t}_days (
    org uuid, customer text, day date, requests bigint, prompt bigint, completion bigint, total bigint, cost numeric,
    latency_sum float8, latency_count bigint, ttft_sum float8, ttft_count bigint, PRIMARY KEY (org, customer, day));
"""
# (e2): the ceiling's per-customer table with one index per usage sort field, as tally keeps
# (every field a client may sort customers by must page by index scan).
SORT_INDEXED = (
    "first_seen",
    "last_active",
    "requests",
    "prompt",
    "completion",
    "total",
    "cost",
    "(latency_sum / nullif(latency_count, 0))",
    "(ttft_sum / nullif(ttft_count, 0))",
    "(last_active - first_seen)",
)
CEILING_DEDUPE = """
INSERT INTO {t}_dedupe SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])
ON CONFLICT DO NOTHING RETURNING org, source, id
"""
_SUMS = ("requests", "prompt", "completion", "total", "cost", "latency_sum", "latency_count", "ttft_sum", "ttft_count")
_ADD = ", ".join(f"{c} = t.{c} + excluded.{c}" for c in _SUMS)
CEILING_CUSTOMERS = f"""
INSERT INTO {{t}}_customers AS t SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::int8[],
    $5::int8[], $6::int8[], $7::numeric[], $8::float8[], $9::int8[], $10::float8[], $11::int8[],
    $12::timestamptz[], $13::timestamptz[])
ON CONFLICT (org, customer) DO UPDATE SET {_ADD},
    first_seen = least(t.first_seen, excluded.first_seen), last_active = greatest(t.last_active, excluded.last_active)
"""
CEILING_DAYS = f"""
INSERT INTO {{t}}_days AS t SELECT * FROM unnest($1::uuid[], $2::text[], $3::date[], $4::int8[], $5::int8[],
    $6::int8[], $7::int8[], $8::numeric[], $9::float8[], $10::int8[], $11::float8[], $12::int8[])
ON CONFLICT (org, customer, day) DO UPDATE SET {_ADD}
"""


def _ceiling_batch(
    org: object, events: list[dict]
) -> tuple[list[list[object]], list[list[object]], list[list[object]]]:
    """The arrays of one ceiling batch: dedupe keys, per-customer sums, per-customer-day sums
    (all aggregation done before the clock starts: (e) times the database alone)."""
    customers: dict[str, list[object]] = {}
    days: dict[tuple[str, object], list[object]] = {}
    for e in events:
        d, at = e["data"], datetime.fromisoformat(e["time"])
        sums = [
            d["requests"],
            d["prompt_tokens"],
            d["completion_tokens"],
            d["prompt_tokens"] + d["completion_tokens"],
            Decimal(d["cost"]),
            d["latency"],
            1,
            d["ttft"],
            1,
        ]
        c = customers.setdefault(e["subject"], [0, 0, 0, 0, Decimal(0), 0.0, 0, 0.0, 0, at, at])
        for i, v in enumerate(sums):
            c[i] += v
        c[9], c[10] = min(c[9], at), max(c[10], at)
        day = days.setdefault((e["subject"], at.date()), [0, 0, 0, 0, Decimal(0), 0.0, 0, 0.0, 0])
        for i, v in enumerate(sums):
            day[i] += v
    dedupe = [[org] * len(events), [e["source"] for e in events], [e["id"] for e in events]]
    cust_rows = [[org, k, *v] for k, v in sorted(customers.items())]
    day_rows = [[org, k[0], k[1], *v] for k, v in sorted(days.items())]
    return (
        dedupe,
        [list(col) for col in zip(*cust_rows, strict=True)],
        [list(col) for col in zip(*day_rows, strict=True)],
    )


async def ceiling(dsn: str, org: object, events: list[dict], batch_size: int, *, sort_indexes: bool = False) -> Rate:
    """(e) the database's ceiling for these events: batched dedupe, then per-customer and
    per-customer-day sums upserted into narrow tables that have only their primary keys;
    with ``sort_indexes`` (e2), plus one index per usage sort field on the per-customer table."""
    batches = [_ceiling_batch(org, events[i : i + batch_size]) for i in range(0, len(events), batch_size)]
    t = "ceiling_ix" if sort_indexes else "ceiling"
    conn = await asyncpg.connect(dsn, server_settings={"timezone": "UTC"})
    try:
        await conn.execute(CEILING_SCHEMA.format(t=t))
        if sort_indexes:
            for i, expr in enumerate(SORT_INDEXED):
                await conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_sort_{i} ON {t}_customers (org, {expr}, customer)")
        statements = [CEILING_DEDUPE.format(t=t), CEILING_CUSTOMERS.format(t=t), CEILING_DAYS.format(t=t)]
        started = time.perf_counter()
        for dedupe, customers, days in batches:
            async with conn.transaction():
                await conn.fetch(statements[0], *dedupe)
                await conn.execute(statements[1], *customers)
                await conn.execute(statements[2], *days)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return Rate(len(events) / elapsed)


async def _customers_source(pool: asyncpg.Pool) -> str:
    """Where customers' aggregates are read: the customer_rows view (migration 0007 on), else
    the customers table (so that this benchmark also measures earlier versions of tally)."""
    return "customer_rows" if await pool.fetchval("SELECT to_regclass('customer_rows') IS NOT NULL") else "customers"


async def folded(pool: asyncpg.Pool, org: str) -> int:
    """Requests the database holds for ``org``: the events fully applied (aggregates included).
    One table, no join: the join through the customer_rows view, polled on a pool whose
    prepared statement PostgreSQL had planned once while the tables were empty (a generic plan,
    never re-planned without ANALYZE), became a nested loop over both tables: 18 s a poll at
    20,000 customers, two cores' worth of work beside the fold it was timing."""
    usage = "customer_usage" if await pool.fetchval("SELECT to_regclass('customer_usage') IS NOT NULL") else "customers"
    return int(
        await pool.fetchval(
            f"SELECT coalesce(sum(number_of_requests), 0) FROM {usage}"
            " WHERE organization_id = (SELECT id FROM organizations WHERE name = $1)",
            org,
        )
    )


async def exact(pool: asyncpg.Pool, org: str, events: list[dict]) -> bool:
    """Every customer's requests, tokens and cost equal the sums of the events sent."""
    want: dict[str, list[object]] = {}
    for e in events:
        w = want.setdefault(e["subject"], [0, 0, Decimal(0)])
        w[0] += e["data"]["requests"]
        w[1] += e["data"]["prompt_tokens"] + e["data"]["completion_tokens"]
        w[2] += Decimal(e["data"]["cost"])
    source = await _customers_source(pool)
    rows = await pool.fetch(
        f"SELECT customer_identifier, number_of_requests, total_tokens, total_cost FROM {source} u"
        " JOIN organizations o ON o.id = u.organization_id WHERE o.name = $1",
        org,
    )
    got = {r["customer_identifier"]: [r["number_of_requests"], r["total_tokens"], r["total_cost"]] for r in rows}
    return got == want


async def applied(session: aiohttp.ClientSession, port: int) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tally_events_total{") and 'outcome="applied"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def tally_consumers(
    names: Names, dsn: str, org: str, n_events: int, workdir: Path, processes: int = 1, **env: str
) -> tuple[Rate, list[object]]:
    """(d) `tally consume` on the preloaded queue (``processes`` of them), timed from the first
    applied event until the database holds every event's sums: events/s, CPU and peak RSS of
    each and its children."""
    started_processes = []
    for i in range(processes):
        port = free_port()
        started_processes.append(
            start_tally(
                "consume",
                {
                    "TALLY_DATABASE_URL": dsn,
                    "TALLY_AMQP_NAMESPACE": names.namespace,
                    "TALLY_CONSUMER_HTTP_PORT": str(port),
                    "TALLY_HTTP_HOST": "127.0.0.1",
                    **env,
                },
                workdir / f"consumer-{names.namespace}-{i}.log",
                port,
            )
        )
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        for process in started_processes:
            await wait_ready(f"http://127.0.0.1:{process.port}/healthz", process)
        started = None
        cpu_start = 0.0
        async with aiohttp.ClientSession() as session:
            while True:
                # The consumers' own count of events applied (after each commit): reading it
                # costs the database nothing, where a sum over the customers polled beside the
                # fold competed with it. Fine-grained only where the clock starts and stops.
                count = sum([await applied(session, p.port) for p in started_processes])
                now = time.perf_counter()
                if started is None and count > 0:
                    started, cpu_start = now, sum(p.cpu_seconds() for p in started_processes)
                if count >= n_events:
                    break
                await asyncio.sleep(0.02 if count == 0 or count >= 0.95 * n_events else 0.25)
        assert started is not None
        held = await folded(pool, org)  # the database holds what the consumers counted
        assert held == n_events, f"the consumers counted {n_events:,} events applied, the database holds {held:,}"
        elapsed = now - started
        cpu = sum(p.cpu_seconds() for p in started_processes) - cpu_start
        rate = Rate(
            n_events / elapsed,
            extra={
                "processes": processes,
                "cpu_seconds": round(cpu, 2),
                "cores_used": round(cpu / elapsed, 2),
                "peak_rss_mb": round(max(p.peak_rss_mb() for p in started_processes), 1),
            },
        )
        return rate, started_processes
    except BaseException:
        for process in started_processes:
            process.stop()
        raise
    finally:
        await pool.close()


async def _publish_load(namespace: str, org: str, rate: int, seconds: float, ready: Any) -> float:
    """Publish ``rate * seconds`` single events at a steady ``rate``, from when ``ready`` is
    set (connected, events made); the rate achieved."""
    connection = await aio_pika.connect(AMQP_URL)
    publishes: list[asyncio.Future[object]] = []
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(connection, channel, Names(namespace))
        background = generate(org, int(rate * seconds), 1000, seed=99)
        interval = 1 / rate
        ready.set()
        started = time.perf_counter()
        for i, event in enumerate(background):
            # Confirms are awaited in the background: a steady rate needs many in flight.
            message = aio_pika.Message(orjson.dumps(event))
            publishes.append(asyncio.ensure_future(topology.events.publish(message, routing_key="usage.recorded")))
            delay = started + (i + 1) * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*publishes)
        return len(background) / (time.perf_counter() - started)
    finally:
        await connection.close()


def load_generator(namespace: str, org: str, rate: int, seconds: float, ready: Any, achieved: Any) -> None:
    """The freshness run's load, in a process of its own (so that its own backlog of
    publishes and confirms never delays a probe): sets ``ready`` when it starts publishing,
    reports the rate it achieved."""
    achieved.put(asyncio.run(_publish_load(namespace, org, rate, seconds, ready)))


def _from_child(process: Any, poll: Callable[[], T | None], what: str, timeout: float) -> T:
    """``poll()``'s first answer that is not None (it waits up to a second itself), unless the
    child process exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = poll()
        if answer is not None:
            return answer
        if process.exitcode is not None:
            raise RuntimeError(f"the load generator exited ({process.exitcode}) before {what}")
    raise TimeoutError(f"the load generator: no {what} in {timeout:.0f} s")


def _queued(queue: Any) -> Callable[[], float | None]:
    def poll() -> float | None:
        try:
            rate: float = queue.get(timeout=1)
        except Empty:
            return None
        return rate

    return poll


async def freshness(names: Names, api_port: int, key: str, org: str, rate: int, seconds: float) -> Rate:
    """Single events published at ``rate``/s by a process of their own, and meanwhile, ten
    times a second from this one, an event of a new customer whose first appearance in
    GET /v1/customers/{id} is timed from its publish."""
    context = multiprocessing.get_context("spawn")
    ready, achieved = context.Event(), context.Queue()
    generator = context.Process(target=load_generator, args=(names.namespace, org, rate, seconds, ready, achieved))
    connection = await aio_pika.connect(AMQP_URL)
    latencies: list[float] = []
    pollers: list[asyncio.Task[None]] = []
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(connection, channel, names)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            template = generate(org, 1, 1, seed=7)[0]

            async def probe(ident: str) -> None:
                event = {**template, "id": ident, "subject": ident, "time": datetime.now(UTC).isoformat()}
                sent = time.perf_counter()
                await topology.events.publish(aio_pika.Message(orjson.dumps(event)), routing_key="usage.recorded")
                deadline = sent + 30
                while time.perf_counter() < deadline:
                    async with session.get(f"http://127.0.0.1:{api_port}/v1/customers/{ident}") as r:
                        await r.read()
                        if r.status == 200:
                            latencies.append((time.perf_counter() - sent) * 1000)
                            return
                    await asyncio.sleep(0.01)

            generator.start()
            # The probes run while the load does: from when it starts publishing (the child
            # imports, connects and makes its events first), for as long.
            await asyncio.to_thread(_from_child, generator, lambda: ready.wait(1) or None, "publishing", 120.0)
            started = time.perf_counter()
            for i in range(int(seconds * 10)):
                pollers.append(asyncio.create_task(probe(f"probe_{i}")))
                delay = started + (i + 1) / 10 - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.gather(*pollers)
            rate_achieved = await asyncio.to_thread(_from_child, generator, _queued(achieved), "its rate", seconds + 60)
            await asyncio.to_thread(generator.join, 10)
    finally:
        if generator.is_alive():
            generator.kill()
            generator.join()
        await connection.close()
    return Rate(
        rate_achieved,
        percentile(latencies, 50),
        percentile(latencies, 99),
        errors=len(pollers) - len(latencies),
        extra={"probes": len(latencies)},
    )


async def fresh_database(args: argparse.Namespace, run: str) -> str:
    dsn = with_database(args.dsn, f"tally_bench_ingest_{run}")
    await migrate(dsn, Path(__file__).resolve().parent.parent / "migrations")
    return dsn


async def drop_database(args: argparse.Namespace, dsn: str) -> None:
    if not args.keep:
        admin = await asyncpg.connect(with_database(args.dsn, "postgres"))
        await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
        await admin.close()


async def scale_out(args: argparse.Namespace, run: str, workdir: Path) -> dict[str, object]:
    """1, 2, 4… `tally consume` on one queue (each of ``--processes`` processes, 1 unless
    given): events/s, and whether every customer's sums are exact afterwards (nothing lost or
    doubled, no deadlock)."""
    dsn = await fresh_database(args, run)
    rows, results = [], {}
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        for n in args.scale:
            org, names = f"bench-scale-{n}", Names(f"tally_bench_{run}_scale{n}")
            async with pool.acquire() as conn:
                await auth.create_organization(conn, org)
            events = generate(org, args.events, args.customers, seed=10 + n, profile=args.profile)
            await preload(names, bodies(events, args.batch), f"{n} consumer(s)")
            rate, processes = await tally_consumers(
                names, dsn, org, args.events, workdir, processes=n, TALLY_CONSUMER_PROCESSES=str(args.processes or 1)
            )
            correct = await exact(pool, org, events)
            deadlocks = sum(p.log.read_text(errors="replace").lower().count("deadlock") for p in processes)
            for process in processes:
                process.stop()
            await delete_namespace(names)
            results[str(n)] = {**rate.as_dict(), "exact": correct, "deadlock_mentions": deadlocks}
            rows.append([n, rate.per_second, rate.extra["cores_used"], "yes" if correct else "NO", deadlocks])
            print(f"{n} consumer(s): {rate.per_second:,.0f} events/s, exact: {correct}", file=sys.stderr)
    finally:
        await pool.close()
        await drop_database(args, dsn)
    print_table(
        f"Scale-out: {args.events:,} events, {args.batch} per message, {args.customers:,} customers ({args.profile})",
        [
            f"tally consume (x {args.processes or 1} processes)",
            "events/s",
            "cores busy",
            "exact aggregates",
            "deadlocks logged",
        ],
        rows,
    )
    return {"scale_out": results}


async def backlog(args: argparse.Namespace, run: str, workdir: Path) -> dict[str, object]:
    """One consumer on a backlog of ``args.backlog`` single-event messages: peak RSS and rate."""
    dsn = await fresh_database(args, run)
    names, org = Names(f"tally_bench_{run}_backlog"), "bench-backlog"
    conn = await asyncpg.connect(dsn)
    await auth.create_organization(conn, org)
    await conn.close()
    try:
        events = generate(org, args.backlog, args.customers, seed=7, profile=args.profile)
        await preload(names, bodies(events, 1), "backlog")
        del events
        rate, processes = await tally_consumers(names, dsn, org, args.backlog, workdir)
        for process in processes:
            process.stop()
    finally:
        await delete_namespace(names)
        await drop_database(args, dsn)
    print(
        f"backlog of {args.backlog:,} messages: {rate.per_second:,.0f} events/s, peak RSS "
        f"{rate.extra['peak_rss_mb']} MB"
    )
    return {"backlog": {"messages": args.backlog, **rate.as_dict()}}


# The order of the model comparison's runs: each variant once before and once after the other,
# so that neither always runs second, on a database already holding the other's rows.
MODEL_RUNS = ("without", "with", "with", "without")


async def model_comparison(args: argparse.Namespace, run: str, workdir: Path) -> dict[str, object]:
    """The same events without a model and with one of ``args.models`` models (and a provider)
    on every event, through (c) the fold alone and (d) tally's consumer, in one run and in the
    order of MODEL_RUNS: each variant's events/s (the mean of its two runs), and with/without."""
    dsn = await fresh_database(args, run)
    conn = await asyncpg.connect(dsn)
    runs = list(enumerate(MODEL_RUNS))
    for stage in ("fold", "tally"):
        for i, label in runs:
            await auth.create_organization(conn, f"bench-{stage}-{label}-{i}")
    await conn.close()
    names = {i: Names(f"tally_bench_{run}_models_{i}") for i, _ in runs}
    rates: dict[str, dict[str, list[Rate]]] = {"c_fold_alone": {}, "d_tally_consumer": {}}
    try:
        for stage, key, seed in (("fold", "c_fold_alone", 3), ("tally", "d_tally_consumer", 1)):
            plain = generate("", args.events, args.customers, seed=seed, profile=args.profile)
            for i, label in runs:
                org = f"bench-{stage}-{label}-{i}"
                events = [{**e, "organization": org} for e in plain]
                if label == "with":
                    events = with_models(events, org, args.models, seed)
                if stage == "fold":
                    rate = await fold_direct(dsn, events, args.fold_batch)
                else:
                    await preload(names[i], bodies(events, args.batch), f"tally, {label} a model")
                    rate, processes = await tally_consumers(names[i], dsn, org, args.events, workdir)
                    for process in processes:
                        process.stop()
                rates[key].setdefault(label, []).append(rate)
                print(f"({key[0]}) {label} a model: {rate.per_second:,.0f} events/s", file=sys.stderr)
    finally:
        for n in names.values():
            await delete_namespace(n)
        await drop_database(args, dsn)

    def mean(label_rates: list[Rate]) -> float:
        return sum(r.per_second for r in label_rates) / len(label_rates)

    results: dict[str, object] = {
        key: {
            **{label: [r.as_dict() for r in label_rates] for label, label_rates in by_label.items()},
            "with_over_without": round(mean(by_label["with"]) / mean(by_label["without"]), 3),
        }
        for key, by_label in rates.items()
    }
    print_table(
        f"Ingest with a model on every event ({args.models} models) against without: {args.events:,} events, "
        f"{args.batch} per message, {args.customers:,} customers ({args.profile}); runs {', '.join(MODEL_RUNS)}",
        ["stage", "without a model, events/s", "with a model, events/s", "with / without"],
        [
            [
                "(c) fold alone" if key == "c_fold_alone" else "(d) tally consumer",
                mean(by_label["without"]),
                mean(by_label["with"]),
                round(mean(by_label["with"]) / mean(by_label["without"]), 3),
            ]
            for key, by_label in rates.items()
        ],
    )
    return {"models": args.models, "runs": list(MODEL_RUNS), "model_comparison": results}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1, help="events per broker message (1 = single-event)")
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--profile", choices=["zipf", "spread"], default="zipf", help="activity over the customers")
    parser.add_argument("--naive-events", type=int, default=20_000, help="events for the naive consumer")
    parser.add_argument(
        "--fold-batch", type=int, default=4000, help="events per transaction for (c) and (e): tally's largest batch"
    )
    parser.add_argument("--rate", type=int, default=1000, help="events/s for the freshness run")
    parser.add_argument("--freshness-seconds", type=float, default=15)
    parser.add_argument("--scale", type=lambda v: [int(x) for x in v.split(",")], help="e.g. 1,2,4: only scale out")
    parser.add_argument(
        "--processes",
        type=int,
        help="TALLY_CONSUMER_PROCESSES of each `tally consume` (default: tally's own, one per core; 1 for --scale)",
    )
    parser.add_argument("--backlog", type=int, help="only the backlog run: this many single-event messages")
    parser.add_argument(
        "--models",
        type=int,
        choices=range(1, len(MODELS) + 1),
        metavar=f"1..{len(MODELS)}",
        help="only the model comparison: (c) and (d) on the same events without and with one of this many models",
    )
    parser.add_argument("--dsn", default=os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    run = secrets.token_hex(3)
    workdir = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    base = {
        "benchmark": "ingest",
        "events": args.events,
        "events_per_message": args.batch,
        "customers": args.customers,
        "profile": args.profile,
        "machine": machine(),
    }
    if args.scale:
        write_json(args.json, {**base, "results": await scale_out(args, run, workdir)})
        return 0
    if args.backlog:
        write_json(args.json, {**base, "results": await backlog(args, run, workdir)})
        return 0
    if args.models:
        write_json(args.json, {**base, "results": await model_comparison(args, run, workdir)})
        return 0

    chosen_processes = {"TALLY_CONSUMER_PROCESSES": str(args.processes)} if args.processes else {}
    dsn = await fresh_database(args, run)
    conn = await asyncpg.connect(dsn)
    for org in ("bench-naive", "bench-fold", "bench-tally", "bench-fresh", "bench-ceiling", "bench-ceiling-ix"):
        await auth.create_organization(conn, org)
    ceiling_org = await conn.fetchval("SELECT id FROM organizations WHERE name = 'bench-ceiling'")
    indexed_org = await conn.fetchval("SELECT id FROM organizations WHERE name = 'bench-ceiling-ix'")
    key = (await auth.create_key(conn, "bench-fresh", ("read",))).key
    await conn.close()
    names = {stage: Names(f"tally_bench_{run}_{stage}") for stage in ("bare", "naive", "tally", "fresh")}
    processes = []
    try:
        events = generate("bench-tally", args.events, args.customers, seed=1, profile=args.profile)
        messages = bodies(events, args.batch)
        await preload(names["bare"], messages, "bare")
        bare = await bare_consumer(names["bare"], args.events, prefetch=2000)
        print(f"(a) bare consumer: {bare.per_second:,.0f} events/s", file=sys.stderr)

        naive_events = generate("bench-naive", args.naive_events, args.customers, seed=2, profile=args.profile)
        await preload(names["naive"], bodies(naive_events, args.batch), "naive")
        naive = await naive_consumer(names["naive"], dsn, args.naive_events)
        print(f"(b) naive consumer: {naive.per_second:,.0f} events/s", file=sys.stderr)

        fold_events = generate("bench-fold", args.events, args.customers, seed=3, profile=args.profile)
        direct = await fold_direct(dsn, fold_events, args.fold_batch)
        print(f"(c) fold alone: {direct.per_second:,.0f} events/s", file=sys.stderr)

        ceiling_events = generate("bench-ceiling", args.events, args.customers, seed=3, profile=args.profile)
        top = await ceiling(dsn, ceiling_org, ceiling_events, args.fold_batch)
        print(f"(e) database ceiling: {top.per_second:,.0f} events/s", file=sys.stderr)
        indexed_events = generate("bench-ceiling-ix", args.events, args.customers, seed=3, profile=args.profile)
        top_indexed = await ceiling(dsn, indexed_org, indexed_events, args.fold_batch, sort_indexes=True)
        print(f"(e2) ceiling with sort indexes: {top_indexed.per_second:,.0f} events/s", file=sys.stderr)

        await preload(names["tally"], messages, "tally")
        consumer_rate, consumers = await tally_consumers(
            names["tally"], dsn, "bench-tally", args.events, workdir, **chosen_processes
        )
        processes.extend(consumers)
        print(f"(d) tally consumer: {consumer_rate.per_second:,.0f} events/s", file=sys.stderr)
        for consumer in consumers:
            consumer.stop()

        # Freshness: a consumer and the API running, events published at a steady rate.
        port = free_port()
        api = start_tally(
            "api",
            {"TALLY_DATABASE_URL": dsn, "TALLY_HTTP_PORT": str(port), "TALLY_HTTP_HOST": "127.0.0.1", **UNLIMITED},
            workdir / "api.log",
            port,
        )
        processes.append(api)
        live = start_tally(
            "consume",
            {
                "TALLY_DATABASE_URL": dsn,
                "TALLY_AMQP_NAMESPACE": names["fresh"].namespace,
                "TALLY_CONSUMER_HTTP_PORT": str(free_port()),
                "TALLY_HTTP_HOST": "127.0.0.1",
                **chosen_processes,
            },
            workdir / "live.log",
        )
        processes.append(live)
        await wait_ready(f"http://127.0.0.1:{port}/healthz", api)
        await asyncio.sleep(1)  # the consumer declares its queue before we publish into it
        fresh = await freshness(names["fresh"], port, key, "bench-fresh", args.rate, args.freshness_seconds)
        print(f"freshness: p50 {fresh.p50_ms:.0f} ms, p99 {fresh.p99_ms:.0f} ms", file=sys.stderr)
        api_rss = api.peak_rss_mb()
    finally:
        for process in processes:
            process.stop()
        for n in names.values():
            await delete_namespace(n)
        await drop_database(args, dsn)

    d = consumer_rate.per_second
    results = {
        "a_bare_consumer": bare.as_dict(),
        "b_naive_consumer": naive.as_dict(),
        "c_fold_alone": direct.as_dict(),
        "d_tally_consumer": consumer_rate.as_dict(),
        "e_database_ceiling": top.as_dict(),
        "e2_ceiling_with_sort_indexes": top_indexed.as_dict(),
        "ratios": {
            "d_over_a": round(d / bare.per_second, 3),
            "d_over_b": round(d / naive.per_second, 2),
            "d_over_c": round(d / direct.per_second, 3),
            "d_over_e": round(d / top.per_second, 3),
            "d_over_e2": round(d / top_indexed.per_second, 3),
        },
        "freshness": {**fresh.as_dict(), "target_rate": args.rate},
        "api_peak_rss_mb_during_freshness": round(api_rss, 1),
    }
    print_table(
        f"Ingest: {args.events:,} events, {args.batch} per message, {args.customers:,} customers ({args.profile})",
        ["consumer", "events/s", "tally / this"],
        [
            ["(a) bare: decode + ack", bare.per_second, round(d / bare.per_second, 3)],
            ["(b) naive: 1 transaction/event", naive.per_second, round(d / naive.per_second, 2)],
            ["(c) fold alone (database share)", direct.per_second, round(d / direct.per_second, 3)],
            ["(d) tally consumer", d, 1.0],
            ["(e) database ceiling", top.per_second, round(d / top.per_second, 3)],
            ["(e2) ceiling + usage sort indexes", top_indexed.per_second, round(d / top_indexed.per_second, 3)],
        ],
    )
    extra = consumer_rate.extra
    print(f"\ntally consumer: {extra['cores_used']} cores busy, peak RSS {extra['peak_rss_mb']} MB")
    print(
        f"freshness at {fresh.per_second:,.0f} events/s: publish→visible p50 {fresh.p50_ms:.0f} ms,"
        f" p99 {fresh.p99_ms:.0f} ms over {fresh.extra['probes']} probes ({fresh.errors} never visible)"
    )
    write_json(args.json, {**base, "naive_events": args.naive_events, "results": results})
    return 0


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main()))
