"""Webhook benchmark: (a) the fold's ingest rate through `tally consume` with no webhook
endpoint against the same with N endpoints (default 10) subscribed to the organization's
events, in pairs of runs alternating which goes first (--rounds, default 2) — the fold must not
pay for webhooks (the goal: with ≥ 0.9× without, the pairs' mean) — and (b) deliveries/s: a
backlog of customer changes turned into deliveries and sent to a local aiohttp receiver by one
consumer process's dispatcher.

    python bench/webhooks.py [--events 200000] [--customers 20000] [--endpoints 10] [--json …]
    python bench/webhooks.py --dispatch separate      # the endpoints' run dispatched by `tally webhooks`
    python bench/webhooks.py --types customer.created,customer.deleted,alert.budget
    python bench/webhooks.py --events 2000 --customers 200 --deliveries 200   # a quick check

The ingest runs use bench/ingest.py's pieces (its event generator, preload and consumer
timing) on a fresh database and private broker namespaces, dropped afterwards. The receiver
answers 200 at once; it runs in this process, beside the load, on 127.0.0.1 (so the consumers
run with TALLY_WEBHOOK_ALLOW_PRIVATE=true).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Rate, free_port, machine, print_table, start_tally, wait_ready, write_json  # noqa: E402
from bench.ingest import (  # noqa: E402
    bodies,
    delete_namespace,
    drop_database,
    fold_direct,
    fresh_database,
    generate,
    preload,
    tally_consumers,
)
from service.domain.webhooks import EVENT_TYPES, new_secret  # noqa: E402
from service.infra.broker import Names  # noqa: E402
from service.store import auth  # noqa: E402
from service.store import webhooks as store  # noqa: E402


class Receiver:
    """An aiohttp server on 127.0.0.1 that answers 200 to every POST and counts them."""

    def __init__(self) -> None:
        self.received = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        return web.Response()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def subscribe(dsn: str, org: str, url: str, n: int, types: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        org_id = await conn.fetchval("SELECT id FROM organizations WHERE name = $1", org)
        for i in range(n):
            await store.create_endpoint(conn, org_id, "prod", f"{url}/hook/{i}", types, new_secret(), most=n)
    finally:
        await conn.close()


async def ingest(
    args: argparse.Namespace, dsn: str, org: str, run: str, workdir: Path, seed: int, *, separate: bool = False
) -> Rate:
    """The fold's rate through one `tally consume` on a preloaded queue (bench/ingest.py's (d));
    with ``separate``, the consumer does not dispatch webhooks and a `tally webhooks` process does."""
    names = Names(f"tally_bench_{run}_{org}")
    dispatcher = None
    if separate:
        port = free_port()
        env = {"TALLY_DATABASE_URL": dsn, "TALLY_CONSUMER_HTTP_PORT": str(port), "TALLY_HTTP_HOST": "127.0.0.1"}
        dispatcher = start_tally("webhooks", env, workdir / "webhooks.log", port)
        await wait_ready(f"http://127.0.0.1:{port}/healthz", dispatcher)
        os.environ["TALLY_WEBHOOK_DISPATCH"] = "false"
    try:
        events = generate(org, args.events, args.customers, seed=seed, profile=args.profile)
        await preload(names, bodies(events, args.batch), org)
        rate, processes = await tally_consumers(names, dsn, org, args.events, workdir)
        for process in processes:
            process.stop()
        if dispatcher is not None:
            rate.extra["dispatcher_cpu_seconds"] = round(dispatcher.cpu_seconds(), 2)  # its start included
        return rate
    finally:
        os.environ.pop("TALLY_WEBHOOK_DISPATCH", None)
        if dispatcher is not None:
            dispatcher.stop()
        await delete_namespace(names)


async def set_aside(dsn: str, org: str) -> dict[str, int]:
    """The deliveries the organization's endpoints were given (and had delivered when its fold
    was done), then its endpoints deleted: (b) measures its own backlog alone."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(COUNT_DELIVERIES, org)
        assert row is not None
        await conn.execute(
            "DELETE FROM webhook_endpoints e USING organizations o WHERE o.id = e.organization_id AND o.name = $1", org
        )
        # The deleted endpoints' deliveries (160k when the dispatcher keeps up) are dead rows
        # that every claim would step over until a vacuum, and a server without autovacuum
        # (as this one may be) never runs one: (b) starts from a vacuumed table.
        await conn.execute("VACUUM ANALYZE webhook_deliveries")
    finally:
        await conn.close()
    return {"made": row["made"], "delivered": row["delivered"]}


COUNT_DELIVERIES = """
SELECT count(*) AS made, count(*) FILTER (WHERE state = 'delivered') AS delivered
FROM webhook_deliveries d JOIN organizations o ON o.id = d.organization_id WHERE o.name = $1
"""


async def deliveries(args: argparse.Namespace, dsn: str, org: str, url: str, run: str, workdir: Path) -> Rate:
    """(b) Customers created by the fold while no consumer runs (so their changes wait in the
    change log), then one consumer process started: deliveries/s from its first delivery until
    every delivery of the backlog was made and delivered."""
    await subscribe(dsn, org, url, 1, ["customer.created"])
    events = generate(org, args.deliveries, args.deliveries, seed=9, profile="spread")
    expected = len({e["subject"] for e in events})  # one customer.created per customer
    await fold_direct(dsn, events, 1000)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    port = free_port()
    names = Names(f"tally_bench_{run}_deliver")
    process = start_tally(
        "consume",
        {
            "TALLY_DATABASE_URL": dsn,
            "TALLY_AMQP_NAMESPACE": names.namespace,
            "TALLY_CONSUMER_HTTP_PORT": str(port),
            "TALLY_HTTP_HOST": "127.0.0.1",
        },
        workdir / "deliver.log",
        port,
    )
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz", process)
        while True:  # timed from the first delivery: the process's start is not the dispatch's work
            early = await pool.fetchrow(COUNT_DELIVERIES, org)
            assert early is not None
            if early["delivered"]:
                break
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        cpu_start = process.cpu_seconds()
        while True:
            row = await pool.fetchrow(COUNT_DELIVERIES, org)
            assert row is not None
            if row["delivered"] >= expected:
                break
            if time.perf_counter() - started > args.timeout:
                raise RuntimeError(f"{row['delivered']} of {expected} delivered after {args.timeout} s")
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        cpu = process.cpu_seconds() - cpu_start
        timed = row["delivered"] - early["delivered"]
        return Rate(
            timed / elapsed,
            extra={"delivered": timed, "cores_used": round(cpu / elapsed, 2), "seconds": round(elapsed, 2)},
        )
    finally:
        process.stop()
        await pool.close()
        await delete_namespace(names)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="usage events per ingest run")
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1, help="events per broker message")
    parser.add_argument("--profile", choices=["zipf", "spread"], default="zipf")
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints subscribed in the hooked ingest runs")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="pairs of ingest runs, without and with endpoints, in alternating order (the second run of a pair "
        "was up to 1.14x the first with no endpoint in either)",
    )
    parser.add_argument(
        "--types",
        type=lambda v: v.split(","),
        default=list(EVENT_TYPES),
        help="event types the endpoints take (default: all, customer.updated included: one per customer per batch)",
    )
    parser.add_argument(
        "--dispatch",
        choices=["consumer", "separate"],
        default="consumer",
        help="who dispatches in the run with endpoints: the consumer itself (the default), or a `tally webhooks` "
        "process beside a consumer run with TALLY_WEBHOOK_DISPATCH=false",
    )
    parser.add_argument("--deliveries", type=int, default=5000, help="events (about as many customers) for (b)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds (b) may take")
    parser.add_argument("--dsn", default=os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    # The consumers started below deliver to the receiver on 127.0.0.1.
    os.environ["TALLY_WEBHOOK_ALLOW_PRIVATE"] = "true"
    run = secrets.token_hex(3)
    workdir = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    receiver = Receiver()
    await receiver.start()
    dsn = await fresh_database(args, run)
    conn = await asyncpg.connect(dsn)
    for k in range(args.rounds):
        for kind in ("none", "hooked"):
            await auth.create_organization(conn, f"bench-{kind}-{k}")
    await auth.create_organization(conn, "bench-deliver")
    await conn.close()
    # Per round: the rate without endpoints, with them, and the deliveries made by then.
    rounds: list[tuple[Rate, Rate, dict[str, int]]] = []
    try:
        for k in range(args.rounds):
            rates: dict[str, Rate] = {}
            # Alternating which run goes first: a database that grows, and caches that warm, favour
            # one place of the pair (see --rounds).
            for kind in ("none", "hooked") if k % 2 == 0 else ("hooked", "none"):
                org = f"bench-{kind}-{k}"
                if kind == "hooked":
                    await subscribe(dsn, org, receiver.url, args.endpoints, args.types)
                separate = kind == "hooked" and args.dispatch == "separate"
                rates[kind] = await ingest(args, dsn, org, run, workdir, seed=1, separate=separate)
                if kind == "hooked":
                    made = await set_aside(dsn, org)
                print(f"(a) round {k + 1}, {kind}: {rates[kind].per_second:,.0f} events/s", file=sys.stderr)
            rounds.append((rates["none"], rates["hooked"], made))
        sent = await deliveries(args, dsn, "bench-deliver", receiver.url, run, workdir)
        print(f"(b) deliveries: {sent.per_second:,.0f}/s", file=sys.stderr)
    finally:
        await receiver.stop()
        await drop_database(args, dsn)

    ratios = [hooked.per_second / none.per_second for none, hooked, _ in rounds]
    ratio = sum(ratios) / len(ratios)
    rows: list[list[object]] = []
    for k, (none, hooked, _) in enumerate(rounds):
        first = "without first" if k % 2 == 0 else "with first"
        rows.append([f"(a) round {k + 1} ({first}), fold, no endpoint", none.per_second, 1.0])
        rows.append(
            [f"(a) round {k + 1}, fold, {args.endpoints} endpoints subscribed", hooked.per_second, round(ratios[k], 3)]
        )
    rows.append([f"(b) deliveries sent ({sent.extra['delivered']:,} timed, 1 endpoint)", sent.per_second, None])
    print_table(
        f"Webhooks: {args.events:,} events over {args.customers:,} customers ({args.profile}), "
        f"{args.batch} per message; endpoints take {','.join(args.types)}; dispatched by {args.dispatch}",
        ["run", "per second", "ratio"],
        rows,
    )
    print(f"\nthe goal: (a) with endpoints ≥ 0.9 × without; here {ratio:.3f} (the rounds' mean)")
    for k, (_, _, made) in enumerate(rounds):
        made_by_then = f"{made['made']:,} ({made['delivered']:,} delivered)"
        print(f"round {k + 1}: deliveries made for the {args.endpoints} endpoints by the fold's end: {made_by_then}")
    write_json(
        args.json,
        {
            "benchmark": "webhooks",
            "events": args.events,
            "customers": args.customers,
            "events_per_message": args.batch,
            "profile": args.profile,
            "endpoints": args.endpoints,
            "types": args.types,
            "dispatch": args.dispatch,
            "machine": machine(),
            "results": {
                "rounds": [
                    {
                        "fold_no_endpoint": none.as_dict(),
                        "fold_with_endpoints": {**hooked.as_dict(), "deliveries_when_stopped": made},
                        "ratio": round(r, 3),
                    }
                    for (none, hooked, made), r in zip(rounds, ratios, strict=True)
                ],
                "ratio": round(ratio, 3),
                "deliveries": {**sent.as_dict(), "received": receiver.received},
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
