"""Ingest benchmark: the same events through (a) a bare consumer that only decodes and acks,
(b) a naive consumer that runs one transaction per event, (c) tally's fold called directly
on the events in memory (the database's share), and (d) tally's consumer process; then
freshness at a steady publish rate (publish to visible in GET /v1/customers/{id}).

    python bench/ingest.py [--events 200000] [--batch 1] [--json bench/results/ingest.json]

Everything runs against a fresh database and private broker namespaces, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
from service.core import auth  # noqa: E402
from service.core.events import validate_event  # noqa: E402
from service.core.fold import fold  # noqa: E402
from service.infra.broker import Names, declare  # noqa: E402
from service.infra.migrate import migrate  # noqa: E402

AMQP_URL = os.environ.get("TALLY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RETENTION = timedelta(days=35)


def generate(org: str, n: int, customers: int, seed: int) -> list[dict]:
    """n usage events over ``customers`` customers with Zipf-like activity, 20 days of history."""
    rng = random.Random(seed)
    now = datetime.now(UTC) - timedelta(minutes=1)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(customers)]
    who = rng.choices(range(customers), weights=weights, k=n)
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


def bodies(events: list[dict], per_message: int) -> list[bytes]:
    if per_message == 1:
        return [orjson.dumps(e) for e in events]
    return [orjson.dumps(events[i : i + per_message]) for i in range(0, len(events), per_message)]


async def preload(names: Names, messages: list[bytes], label: str) -> None:
    """Publish with confirms, many in flight at once, before any consumer starts."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, names)
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
        for queue in (names.ingest, names.dead, names.alerts):
            await channel.queue_delete(queue)
        for exchange in (names.events, names.dlx):
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


async def applied(session: aiohttp.ClientSession, port: int) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("tally_events_total{") and 'outcome="applied"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def tally_consumer(names: Names, dsn: str, n_events: int, workdir: Path) -> tuple[Rate, object]:
    """(d) tally's consumer process on the preloaded queue: events/s, CPU and peak RSS."""
    port = free_port()
    process = start_tally(
        "consume",
        {
            "TALLY_DATABASE_URL": dsn,
            "TALLY_AMQP_NAMESPACE": names.namespace,
            "TALLY_CONSUMER_HTTP_PORT": str(port),
            "TALLY_HTTP_HOST": "127.0.0.1",
        },
        workdir / "consumer.log",
        port,
    )
    try:
        async with aiohttp.ClientSession() as session:
            await wait_ready(f"http://127.0.0.1:{port}/healthz", process)
            started = cpu_start = None
            while True:
                count = await applied(session, port)
                now = time.perf_counter()
                if started is None and count > 0:
                    started, cpu_start = now, process.cpu_seconds()
                if count >= n_events:
                    break
                await asyncio.sleep(0.02)
            elapsed = now - started
            cpu = process.cpu_seconds() - cpu_start
        rate = Rate(
            n_events / elapsed,
            extra={
                "cpu_seconds": round(cpu, 2),
                "cores_used": round(cpu / elapsed, 2),
                "peak_rss_mb": round(process.peak_rss_mb(), 1),
            },
        )
        return rate, process
    except BaseException:
        process.stop()
        raise


async def freshness(names: Names, dsn: str, api_port: int, key: str, org: str, rate: int, seconds: float) -> Rate:
    """Publish single events at ``rate``/s; every 100th creates a new customer whose first
    appearance in GET /v1/customers/{id} is timed from its publish."""
    connection = await aio_pika.connect(AMQP_URL)
    latencies: list[float] = []
    pollers: list[asyncio.Task[None]] = []
    publishes: list[asyncio.Future[object]] = []
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(channel, names)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:

            async def watch(ident: str, sent: float) -> None:
                deadline = sent + 30
                while time.perf_counter() < deadline:
                    async with session.get(f"http://127.0.0.1:{api_port}/v1/customers/{ident}") as r:
                        await r.read()
                        if r.status == 200:
                            latencies.append((time.perf_counter() - sent) * 1000)
                            return
                    await asyncio.sleep(0.005)

            background = generate(org, int(rate * seconds), 1000, seed=99)
            interval = 1 / rate
            started = time.perf_counter()
            for i, event in enumerate(background):
                probe = i % 100 == 0
                if probe:
                    event = {**event, "subject": f"probe_{i}", "time": datetime.now(UTC).isoformat()}
                sent = time.perf_counter()
                # Confirms are awaited in the background: a steady rate needs many in flight.
                publishes.append(
                    asyncio.ensure_future(
                        topology.events.publish(aio_pika.Message(orjson.dumps(event)), routing_key="usage.recorded")
                    )
                )
                if probe:
                    pollers.append(asyncio.create_task(watch(f"probe_{i}", sent)))
                delay = started + (i + 1) * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.gather(*publishes)
            achieved = len(background) / (time.perf_counter() - started)
            await asyncio.gather(*pollers)
    finally:
        await connection.close()
    return Rate(
        achieved,
        percentile(latencies, 50),
        percentile(latencies, 99),
        errors=len(pollers) - len(latencies),
        extra={"probes": len(latencies)},
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1, help="events per broker message (1 = single-event)")
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--naive-events", type=int, default=20_000, help="events for the naive consumer")
    parser.add_argument("--fold-batch", type=int, default=1000, help="events per transaction for (c)")
    parser.add_argument("--rate", type=int, default=2000, help="events/s for the freshness run")
    parser.add_argument("--freshness-seconds", type=float, default=15)
    parser.add_argument("--dsn", default=os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    run = secrets.token_hex(3)
    database = f"tally_bench_ingest_{run}"
    dsn = with_database(args.dsn, database)
    await migrate(dsn, Path(__file__).resolve().parent.parent / "migrations")
    conn = await asyncpg.connect(dsn)
    for org in ("bench-naive", "bench-fold", "bench-tally", "bench-fresh"):
        await auth.create_organization(conn, org)
    key = (await auth.create_key(conn, "bench-fresh", ("read",))).key
    await conn.close()
    names = {stage: Names(f"tally_bench_{run}_{stage}") for stage in ("bare", "naive", "tally", "fresh")}
    workdir = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    processes = []
    results: dict[str, object] = {}
    try:
        events = generate("bench-tally", args.events, args.customers, seed=1)
        messages = bodies(events, args.batch)
        await preload(names["bare"], messages, "bare")
        bare = await bare_consumer(names["bare"], args.events, prefetch=2000)
        print(f"(a) bare consumer: {bare.per_second:,.0f} events/s", file=sys.stderr)

        naive_events = generate("bench-naive", args.naive_events, args.customers, seed=2)
        await preload(names["naive"], bodies(naive_events, args.batch), "naive")
        naive = await naive_consumer(names["naive"], dsn, args.naive_events)
        print(f"(b) naive consumer: {naive.per_second:,.0f} events/s", file=sys.stderr)

        direct = await fold_direct(dsn, generate("bench-fold", args.events, args.customers, seed=3), args.fold_batch)
        print(f"(c) fold alone: {direct.per_second:,.0f} events/s", file=sys.stderr)

        await preload(names["tally"], messages, "tally")
        consumer_rate, consumer = await tally_consumer(names["tally"], dsn, args.events, workdir)
        processes.append(consumer)
        print(f"(d) tally consumer: {consumer_rate.per_second:,.0f} events/s", file=sys.stderr)
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
            },
            workdir / "live.log",
        )
        processes.append(live)
        await wait_ready(f"http://127.0.0.1:{port}/healthz", api)
        await asyncio.sleep(1)  # the consumer declares its queue before we publish into it
        fresh = await freshness(names["fresh"], dsn, port, key, "bench-fresh", args.rate, args.freshness_seconds)
        print(f"freshness: p50 {fresh.p50_ms:.0f} ms, p99 {fresh.p99_ms:.0f} ms", file=sys.stderr)
        api_rss = api.peak_rss_mb()
    finally:
        for process in processes:
            process.stop()
        for n in names.values():
            await delete_namespace(n)
        if not args.keep:
            admin = await asyncpg.connect(with_database(args.dsn, "postgres"))
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await admin.close()

    d = consumer_rate.per_second
    results = {
        "a_bare_consumer": bare.as_dict(),
        "b_naive_consumer": naive.as_dict(),
        "c_fold_alone": direct.as_dict(),
        "d_tally_consumer": consumer_rate.as_dict(),
        "ratios": {
            "d_over_a": round(d / bare.per_second, 3),
            "d_over_b": round(d / naive.per_second, 2),
            "d_over_c": round(d / direct.per_second, 3),
        },
        "freshness": {**fresh.as_dict(), "target_rate": args.rate},
        "api_peak_rss_mb_during_freshness": round(api_rss, 1),
    }
    document = {
        "benchmark": "ingest",
        "events": args.events,
        "events_per_message": args.batch,
        "customers": args.customers,
        "naive_events": args.naive_events,
        "machine": machine(),
        "results": results,
    }
    print_table(
        f"Ingest: {args.events:,} events, {args.batch} per message, {args.customers:,} customers",
        ["consumer", "events/s", "vs tally"],
        [
            ["(a) bare: decode + ack", bare.per_second, round(d / bare.per_second, 2)],
            ["(b) naive: 1 transaction/event", naive.per_second, round(d / naive.per_second, 2)],
            ["(c) fold alone (database share)", direct.per_second, round(d / direct.per_second, 2)],
            ["(d) tally consumer", d, 1.0],
        ],
    )
    extra = consumer_rate.extra
    print(f"\ntally consumer: {extra['cores_used']} cores busy, peak RSS {extra['peak_rss_mb']} MB")
    print(
        f"freshness at {fresh.per_second:,.0f} events/s: publish→visible p50 {fresh.p50_ms:.0f} ms,"
        f" p99 {fresh.p99_ms:.0f} ms over {fresh.extra['probes']} probes ({fresh.errors} never visible)"
    )
    write_json(args.json, document)
    return 0


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main()))
