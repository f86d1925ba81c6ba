"""Replicas of every process: two `tally api` and three `tally consume` processes against a
streaming standby and a three-node RabbitMQ cluster (deploy/local/replica.sh,
deploy/local/rabbit-cluster.sh; brought up if they are not running, and left as found).

1. Ingest: N usage events (default 100k, 100 per message) published through tally's own
   publisher over the cluster's three nodes, folded by the three consumers; events/s from the
   first publish until every event is applied, then exactness: each customer's request count
   and cost against the sums of the events sent.
2. Reads: a closed loop over one API process, then over both (requests alternate), on the
   first page of a list and a retrieve, reads served by the standby; requests/s, p50/p99.
3. Read your writes across replicas: a PATCH through one API, then a retrieve through the
   other, with and without the consistency token: stale reads counted.

Prints numbers; asserts nothing about time (the exactness check does fail the run).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import aiohttp
import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    UNLIMITED,
    closed_loop,
    free_port,
    machine,
    print_table,
    start_tally,
    wait_ready,
    with_database,
    write_json,
)
from service.infra.broker import Names, event_message  # noqa: E402
from service.infra.errors import Unavailable  # noqa: E402
from service.infra.migrate import migrate  # noqa: E402
from service.infra.publisher import Publisher  # noqa: E402
from service.store import auth  # noqa: E402

PRIMARY = "postgresql://127.0.0.1:5432/postgres"
STANDBY = "postgresql://127.0.0.1:5433/postgres"
CLUSTER = ",".join(f"amqp://guest:guest@127.0.0.1:568{n}/" for n in (1, 2, 3))
DATABASE = "tally_bench_replicas"


def script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "deploy" / "local" / name), *args], capture_output=True, text=True, timeout=900)


def ensure_topology() -> list[str]:
    """Bring up what is not running; returns the scripts whose topology this run started."""
    started = []
    if not script("replica.sh", "status").stdout.startswith("replica: running"):
        print("starting the standby (deploy/local/replica.sh up)…", flush=True)
        done = script("replica.sh", "up")
        if done.returncode:
            raise SystemExit(done.stdout + done.stderr)
        started.append("replica.sh")
    if script("rabbit-cluster.sh", "status").stdout.count(": running") < 3:
        print("starting the RabbitMQ cluster (deploy/local/rabbit-cluster.sh up)…", flush=True)
        done = script("rabbit-cluster.sh", "up")
        if done.returncode:
            raise SystemExit(done.stdout + done.stderr)
        started.append("rabbit-cluster.sh")
    return started


def make_events(rng: random.Random, org: str, customers: int, n: int) -> list[dict]:
    now = datetime.now(UTC)
    weights = [1 / (i + 1) for i in range(customers)]  # Zipf-like
    out = []
    for i, c in enumerate(rng.choices(range(customers), weights, k=n)):
        out.append(
            {
                "specversion": "1.0",
                "id": f"evt_{i}",
                "source": "bench",
                "type": "usage.recorded",
                "time": (now - timedelta(seconds=rng.uniform(60, 20 * 86_400))).isoformat(),
                "subject": f"cust{c}",
                "organization": org,
                "data": {
                    "requests": 1,
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "cost": f"{rng.randint(0, 10**6) / 10**6:.6f}",
                },
            }
        )
    return out


async def publish_all(publisher: Publisher, events: list[dict], batch: int) -> int:
    """Publish in messages of ``batch`` events with confirms (16 in flight); returns retries."""
    messages = [events[i : i + batch] for i in range(0, len(events), batch)]
    queue, retries = list(reversed(messages)), 0

    async def worker() -> None:
        nonlocal retries
        while queue:
            body = orjson.dumps(queue.pop())
            while True:
                try:
                    await publisher.publish(event_message(body, batch=True), "usage.recorded")
                    break
                except Unavailable:
                    retries += 1
                    await asyncio.sleep(0.2)

    await asyncio.gather(*(worker() for _ in range(16)))
    return retries


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=100, help="events per message")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per read scenario")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=200, help="write-then-read rounds across replicas")
    parser.add_argument("--json")
    parser.add_argument("--keep-topology", action="store_true", help="leave a standby and cluster this run started")
    args = parser.parse_args()

    started = ensure_topology()
    logs = Path(tempfile.mkdtemp(prefix="tally-bench-replicas-"))
    names = Names(f"tally_bench_{uuid.uuid4().hex[:8]}")
    admin = await asyncpg.connect(PRIMARY)
    await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    await admin.close()
    dsn = with_database(PRIMARY, DATABASE)
    await migrate(dsn, ROOT / "migrations")
    conn = await asyncpg.connect(dsn)
    org = f"bench-{uuid.uuid4().hex[:6]}"
    await auth.create_organization(conn, org)
    key = (await auth.create_key(conn, org, ("read", "write"))).key
    standby_dsn = with_database(STANDBY, DATABASE)
    env = {
        **UNLIMITED,
        "TALLY_DATABASE_URL": dsn,
        "TALLY_AMQP_URL": CLUSTER,
        "TALLY_AMQP_NAMESPACE": names.namespace,
        "TALLY_AMQP_MANAGEMENT_URL": "",
        "TALLY_HTTP_HOST": "127.0.0.1",
    }
    processes = []
    try:
        consumers = []
        for i in range(3):
            port = free_port()
            consumers.append(start_tally("consume", {**env, "TALLY_CONSUMER_HTTP_PORT": str(port)}, logs / f"c{i}.log"))
            processes.append(consumers[-1])
            await wait_ready(f"http://127.0.0.1:{port}/readyz", consumers[-1])
        apis = []
        for i in range(2):
            port = free_port()
            api = start_tally(
                "api",
                {**env, "TALLY_DATABASE_READ_URL": standby_dsn, "TALLY_HTTP_PORT": str(port)},
                logs / f"api{i}.log",
                port,
            )
            processes.append(api)
            apis.append(f"http://127.0.0.1:{port}")
            await wait_ready(f"{apis[-1]}/readyz", api)

        # Reads must go to the standby: each API reports it up before anything is measured.
        async with aiohttp.ClientSession() as session:
            for base in apis:
                deadline = time.monotonic() + 60
                while True:
                    async with session.get(f"{base}/readyz") as r:
                        if (await r.json()).get("checks", {}).get("replica") == "ok":
                            break
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{base} does not report the standby up (see {logs})")
                    await asyncio.sleep(0.2)

        # 1. ingest
        rng = random.Random(1)
        events = make_events(rng, org, args.customers, args.events)
        publisher = Publisher(CLUSTER, names)
        t0 = time.perf_counter()
        retries = await publish_all(publisher, events, args.batch)
        published_s = time.perf_counter() - t0
        while await conn.fetchval("SELECT count(*) FROM processed_events") < len(events):
            await asyncio.sleep(0.05)
        ingest_s = time.perf_counter() - t0
        await publisher.close()
        want: dict[str, tuple[int, Decimal]] = defaultdict(lambda: (0, Decimal(0)))
        for e in events:
            n, cost = want[e["subject"]]
            want[e["subject"]] = (n + 1, cost + Decimal(e["data"]["cost"]))
        got = {
            r["customer_identifier"]: (r["number_of_requests"], r["total_cost"])
            for r in await conn.fetch("SELECT customer_identifier, number_of_requests, total_cost FROM customer_rows")
        }
        wrong = sum(got.get(c) != v for c, v in want.items()) + len(set(got) - set(want))
        if wrong:
            raise SystemExit(f"ingest NOT exact: {wrong} customers differ")

        # 2. reads (standby), one API process then both
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            paths = ["/v1/customers?sort_by=-total_cost&limit=50", "/v1/customers/cust1"]
            turn = [0]

            def work(bases: list[str]):  # type: ignore[no-untyped-def]
                async def one() -> None:
                    turn[0] += 1
                    url = bases[turn[0] % len(bases)] + paths[turn[0] // len(bases) % 2]
                    async with session.get(url) as r:
                        await r.read()
                        if r.status != 200:
                            raise RuntimeError(r.status)

                return one

            one_api = await closed_loop(work(apis[:1]), concurrency=args.connections, duration=args.duration)
            two_apis = await closed_loop(work(apis), concurrency=args.connections, duration=args.duration)

            # 3. read your writes across replicas
            stale_with = stale_without = 0
            for i in range(args.rounds):
                async with session.patch(f"{apis[0]}/v1/customers/cust2", json={"name": f"n{i}"}) as r:
                    assert r.status == 200, await r.text()
                    token = r.headers["X-Tally-Consistency"]
                async with session.get(f"{apis[1]}/v1/customers/cust2") as r:
                    stale_without += (await r.json())["name"] != f"n{i}"
                async with session.get(f"{apis[1]}/v1/customers/cust2", headers={"X-Tally-Consistency": token}) as r:
                    stale_with += (await r.json())["name"] != f"n{i}"

        cpu = {p.log.stem: round(p.cpu_seconds(), 1) for p in processes}
        print_table(
            f"Replicas: 3 consumers, 2 API processes, standby on 5433, RabbitMQ cluster 5681-5683 "
            f"({args.events:,} events, {args.customers:,} customers)",
            ["measure", "value"],
            [
                ["ingest events/s (publish → all applied)", len(events) / ingest_s],
                ["publishing alone, events/s", len(events) / published_s],
                ["publishes retried", retries],
                ["customers exact", f"{len(want) - wrong} / {len(want)}"],
                ["reads, 1 API: req/s", one_api.per_second],
                ["reads, 1 API: p50 / p99 ms", f"{one_api.p50_ms:.1f} / {one_api.p99_ms:.1f}"],
                ["reads, 2 APIs: req/s", two_apis.per_second],
                ["reads, 2 APIs: p50 / p99 ms", f"{two_apis.p50_ms:.1f} / {two_apis.p99_ms:.1f}"],
                ["2 APIs / 1 API", two_apis.per_second / one_api.per_second if one_api.per_second else None],
                ["read errors (1 / 2 APIs)", f"{one_api.errors} / {two_apis.errors}"],
                [f"stale reads across replicas, {args.rounds} writes: with token", stale_with],
                ["  without token", stale_without],
            ],
        )
        print(f"process CPU seconds: {cpu}")
        write_json(
            args.json,
            {
                "machine": machine(),
                "events": args.events,
                "ingest_events_per_s": len(events) / ingest_s,
                "publish_retries": retries,
                "exact": True,
                "reads_one_api": one_api.as_dict(),
                "reads_two_apis": two_apis.as_dict(),
                "stale_with_token": stale_with,
                "stale_without_token": stale_without,
                "rounds": args.rounds,
                "cpu_seconds": cpu,
            },
        )
    finally:
        for p in processes:
            p.stop()
        await conn.close()
        if not args.keep_topology:
            for name in reversed(started):
                script(name, "down")


if __name__ == "__main__":
    asyncio.run(main())
