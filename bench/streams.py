"""Change-feed streams benchmark: many Server-Sent Event streams open on one API process while
the consumer folds events at a steady rate. For each phase (a few streams, then many) it
reports the delay from the writing transaction to each event's arrival at a client (p50/p99;
the change's ``changed_at`` is when its transaction logged it, the fold's last step before the
commit but for budget alerts, so the figure is the delay from the commit plus that step), events
delivered per second, and the API's peak RSS and CPU.

    python bench/streams.py [--streams 1000] [--orgs 100] [--rate 2000] [--seconds 20] [--json …]

Streams are spread evenly over ``--orgs`` organizations (one read key each, the per-key cap
raised to fit) and events evenly over their customers, so every stream receives its
organization's share of the changes. The small phase (``--baseline-streams``, 10) runs first
in the same run: the many-stream figures are read against it. Everything runs against a fresh
database and a private broker namespace, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import aiohttp
import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    UNLIMITED,
    Process,
    free_port,
    machine,
    percentile,
    print_table,
    start_tally,
    wait_ready,
    with_database,
    write_json,
)
from bench.ingest import AMQP_URL, delete_namespace, drop_database  # noqa: E402
from service.infra.broker import Names, declare  # noqa: E402
from service.infra.migrate import migrate  # noqa: E402
from service.store import auth  # noqa: E402

CHANGED_AT = re.compile(rb'"changed_at":"([^"]+)"')


class Streams:
    """``n`` event streams over the organizations' keys, recording each change's delay."""

    def __init__(self, port: int, keys: list[str], n: int) -> None:
        self.port, self.keys, self.n = port, keys, n
        self.delays: list[float] = []
        self.events = 0
        self.connected = 0
        self.failures: list[str] = []
        self.recording = False
        # Changes written before this phase began (an earlier phase's, replayed to a stream
        # that starts from the beginning) are not counted.
        self.since = datetime.now(UTC)
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, session: aiohttp.ClientSession) -> None:
        # Each stream follows from its organization's present position (a list's as_of), as a
        # client that lists and then follows does, rather than replaying the log from its start.
        positions = {}
        for key in self.keys[: self.n]:
            url = f"http://127.0.0.1:{self.port}/v1/customers?limit=1"
            async with session.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
                positions[key] = (await r.json())["as_of"]
        self.tasks = [
            asyncio.create_task(
                self._one(session, self.keys[i % len(self.keys)], positions[self.keys[i % len(self.keys)]])
            )
            for i in range(self.n)
        ]
        deadline = time.monotonic() + 60
        while self.connected + len(self.failures) < self.n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _one(self, session: aiohttp.ClientSession, key: str, after: str) -> None:
        url = f"http://127.0.0.1:{self.port}/v1/customers/changes?after={after}"
        headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
        try:
            async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as r:
                if r.status != 200:
                    self.failures.append(f"{r.status} {(await r.text())[:200]}")
                    return
                self.connected += 1
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    match = CHANGED_AT.search(line)
                    if match is None or not self.recording:
                        continue
                    changed = datetime.fromisoformat(match[1].decode())
                    if changed < self.since:
                        continue
                    self.delays.append((datetime.now(UTC) - changed).total_seconds() * 1000)
                    self.events += 1
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.failures.append(repr(exc))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def events_for(orgs: list[str], customers: int, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "specversion": "1.0",
            "id": f"s{seed}-{i}",
            "source": "bench",
            "type": "usage.recorded",
            "time": "",  # stamped when published
            "subject": f"user_{rng.randrange(customers)}",
            "organization": orgs[i % len(orgs)],
            "data": {"requests": 1, "prompt_tokens": 10, "completion_tokens": 5, "cost": "0.001"},
        }
        for i in range(n)
    ]


async def publish_steadily(names: Names, events: list[dict], rate: int, per_message: int) -> float:
    """Publish ``events`` at ``rate`` events/s, ``per_message`` per message; the rate achieved."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = await declare(connection, channel, names)
        pending: list[asyncio.Future[object]] = []
        messages = [events[i : i + per_message] for i in range(0, len(events), per_message)]
        interval = per_message / rate
        started = time.perf_counter()
        for i, batch in enumerate(messages):
            stamp = datetime.now(UTC).isoformat()
            body = orjson.dumps([{**e, "time": stamp} for e in batch])
            pending.append(
                asyncio.ensure_future(topology.events.publish(aio_pika.Message(body), routing_key="usage.recorded"))
            )
            delay = started + (i + 1) * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*pending)
        return len(events) / (time.perf_counter() - started)
    finally:
        await connection.close()


async def phase(
    args: argparse.Namespace, names: Names, api: Process, keys: list[str], orgs: list[str], n: int, seed: int
) -> dict[str, object]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        streams = Streams(api.port or 0, keys, n)
        await streams.start(session)
        print(f"{n} streams: {streams.connected} open, {len(streams.failures)} refused", file=sys.stderr)
        events = events_for(orgs, args.customers, args.rate * args.seconds, seed)
        cpu0, t0, own0 = api.cpu_seconds(), time.perf_counter(), time.process_time()
        streams.recording = True
        achieved = await publish_steadily(names, events, args.rate, args.batch)
        await asyncio.sleep(2)  # the last commits' events still on their way
        streams.recording = False
        elapsed = time.perf_counter() - t0
        cpu = api.cpu_seconds() - cpu0
        own = time.process_time() - own0
        await streams.stop()
    return {
        "streams": n,
        "open": streams.connected,
        "refused": len(streams.failures),
        "published_per_second": round(achieved, 1),
        "delivered_per_second": round(streams.events / elapsed, 1),
        "delay_p50_ms": round(percentile(streams.delays, 50), 1) if streams.delays else None,
        "delay_p99_ms": round(percentile(streams.delays, 99), 1) if streams.delays else None,
        "api_cores_used": round(cpu / elapsed, 2),
        # This process (the streams' client and the publisher): near 1, it is what limits.
        "client_cores_used": round(own / elapsed, 2),
        "api_peak_rss_mb": round(api.peak_rss_mb(), 1),
        "failures": streams.failures[:5],
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--baseline-streams", type=int, default=10)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--customers", type=int, default=200, help="customers per organization")
    parser.add_argument("--rate", type=int, default=2000, help="events published per second")
    parser.add_argument("--batch", type=int, default=10, help="events per broker message")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--dsn", default=os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args()

    run = secrets.token_hex(3)
    dsn = with_database(args.dsn, f"tally_bench_streams_{run}")
    await migrate(dsn, Path(__file__).resolve().parent.parent / "migrations")
    names = Names(f"tally_bench_{run}_streams")
    orgs = [f"bench-stream-{i:03d}" for i in range(args.orgs)]
    conn = await asyncpg.connect(dsn)
    keys = []
    for org in orgs:
        await auth.create_organization(conn, org)
        keys.append((await auth.create_key(conn, org, ("read",))).key)
    await conn.close()
    workdir = Path(tempfile.mkdtemp(prefix="tally-bench-streams-"))
    env = {
        "TALLY_DATABASE_URL": dsn,
        "TALLY_AMQP_NAMESPACE": names.namespace,
        "TALLY_HTTP_HOST": "127.0.0.1",
        "TALLY_CHANGE_STREAMS_PER_KEY": str(args.streams),
        **UNLIMITED,
    }
    api_port, consumer_port = free_port(), free_port()
    api = start_tally("api", {**env, "TALLY_HTTP_PORT": str(api_port)}, workdir / "api.log", api_port)
    consumer = start_tally(
        "consume", {**env, "TALLY_CONSUMER_HTTP_PORT": str(consumer_port)}, workdir / "consumer.log", consumer_port
    )
    results: dict[str, object] = {"machine": machine(), "args": vars(args)}
    try:
        await wait_ready(f"http://127.0.0.1:{api_port}/readyz", api)
        await wait_ready(f"http://127.0.0.1:{consumer_port}/healthz", consumer)
        baseline = await phase(args, names, api, keys, orgs, args.baseline_streams, seed=1)
        many = await phase(args, names, api, keys, orgs, args.streams, seed=2)
        results["phases"] = [baseline, many]
    finally:
        api.stop()
        consumer.stop()
        await delete_namespace(names)
        await drop_database(args, dsn)
    rows = [
        [
            p["streams"],
            p["open"],
            p["published_per_second"],
            p["delivered_per_second"],
            p["delay_p50_ms"],
            p["delay_p99_ms"],
            p["api_cores_used"],
            p["client_cores_used"],
            p["api_peak_rss_mb"],
        ]
        for p in results["phases"]  # type: ignore[union-attr]
    ]
    print_table(
        f"Change streams: {args.orgs} organizations, {args.rate:,} events/s for {args.seconds} s, "
        f"{args.batch} per message",
        [
            "streams",
            "open",
            "published/s",
            "delivered/s",
            "delay p50 ms",
            "delay p99 ms",
            "API cores",
            "client cores",
            "API RSS MB",
        ],
        rows,
    )
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
