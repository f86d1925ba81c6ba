"""Fairness benchmark: another organization's retrieve latency (p50/p99) (a) alone, then
while organization A runs the probe's two abusive workloads against the same API process:
(b) 32 concurrent ``?offset=399000&limit=1000`` lists, (c) 32 concurrent
``?period_budget_share_gte=0&limit=10`` lists. It reports the ratios to (a) and how many of
A's requests the API shed (503: its organization's database share or the pool wait;
429: rate limits) rather than queued.

    python bench/fairness.py [--customers 1000000] [--duration 10] [--json bench/results/fairness.json]

Each scenario runs twice, against an API with fair sharing (the defaults) and against one
without it (one organization may take the whole pool, a minute's wait: tally before issue
10), so both stand in one run; ratios are to the victim alone on the default API.

It uses read.py's dataset (database ``tally_bench_read``, loaded once and reused while its
size matches; ``--database`` picks another): A is the 600k-customer ``bench-big``, the
victim ``bench-mid``. A's load runs in a separate process so that its responses (up to
1000 rows each) do not share the event loop that times the victim's requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    UNLIMITED,
    Rate,
    closed_loop,
    free_port,
    machine,
    percentile,
    print_table,
    start_tally,
    wait_ready,
    with_database,
    write_json,
)
from bench.read import DATABASE, load, settle  # noqa: E402
from service.core import auth  # noqa: E402

# A's abuse starts this long before the victim is measured, so that it is in full effect.
ABUSE_LEAD = 3.0
KEY_ENV = "TALLY_BENCH_KEY"


async def abuse(url: str, key: str, concurrency: int, duration: float) -> dict[str, object]:
    """``concurrency`` closed-loop clients on ``url`` for ``duration`` s: status counts."""
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}"}, timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)
    ) as session:

        async def client() -> None:
            while (started := time.perf_counter()) < stop_at:
                try:
                    async with session.get(url) as r:
                        await r.read()
                        statuses[str(r.status)] += 1
                except (TimeoutError, aiohttp.ClientError) as exc:
                    statuses[type(exc).__name__] += 1
                latencies.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return {
        "statuses": dict(statuses),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
    }


async def abusing(url: str, key: str, concurrency: int, duration: float) -> asyncio.subprocess.Process:
    """Start :func:`abuse` in a child process (this file with ``--abuse``); it prints JSON."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--abuse",
        url,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        env={**os.environ, KEY_ENV: key},
        stdout=asyncio.subprocess.PIPE,
    )


async def victim(url: str, key: str, connections: int, duration: float) -> Rate:
    """The other organization's retrieves, closed loop; non-200 answers count as errors."""
    refused: Counter[int] = Counter()
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}"}, connector=aiohttp.TCPConnector(limit=connections)
    ) as session:

        async def retrieve() -> None:
            async with session.get(url) as r:
                await r.read()
                if r.status != 200:
                    refused[r.status] += 1
                    raise RuntimeError(r.status)

        rate = await closed_loop(retrieve, concurrency=connections, duration=duration)
    rate.extra["refused"] = {str(k): v for k, v in refused.items()}
    return rate


def shed(statuses: dict[str, int]) -> tuple[int, int, int, int]:
    """(served, 503, 429, anything else) among A's requests."""
    served = sum(n for s, n in statuses.items() if s.isdigit() and 200 <= int(s) < 300)
    s503, s429 = statuses.get("503", 0), statuses.get("429", 0)
    return served, s503, s429, sum(statuses.values()) - served - s503 - s429


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds the victim is measured per scenario")
    parser.add_argument("--connections", type=int, default=4, help="the victim's concurrent clients")
    parser.add_argument("--abusers", type=int, default=32, help="A's concurrent clients")
    parser.add_argument("--offset", type=int, default=399_000, help="A's deep offset (scenario b)")
    parser.add_argument("--database", default=DATABASE, help="dataset database (shared with read.py by default)")
    parser.add_argument("--dsn", default=os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))
    parser.add_argument("--reload", action="store_true", help="drop and reload the dataset")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only-default", action="store_true", help="skip the uncapped baseline configuration")
    parser.add_argument("--abuse", help=argparse.SUPPRESS)  # child mode: the URL to hammer
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.abuse:
        print(orjson.dumps(await abuse(args.abuse, os.environ[KEY_ENV], args.concurrency, args.duration)).decode())
        return 0

    await load(args.dsn, args.customers, args.reload, database=args.database)
    dsn = with_database(args.dsn, args.database)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        big_key = (await auth.create_key(conn, "bench-big", ("read",), name="fairness-abuser")).key
        mid_key = (await auth.create_key(conn, "bench-mid", ("read",), name="fairness-victim")).key
        retrieve_id = await conn.fetchval(
            "SELECT customer_identifier FROM customers c JOIN organizations o ON o.id = c.organization_id"
            " WHERE o.name = 'bench-mid' ORDER BY c.total_cost DESC LIMIT 1"
        )
    scenarios = [
        ("(a) alone", None),
        (f"(b) A: {args.abusers} x offset={args.offset}&limit=1000", f"/v1/customers?offset={args.offset}&limit=1000"),
        (
            f"(c) A: {args.abusers} x period_budget_share_gte=0&limit=10",
            "/v1/customers?period_budget_share_gte=0&limit=10",
        ),
    ]

    # The API as deployed by default (pool of 8, so 4 per organization, 2 s bounded waits),
    # and, as the baseline of the same run, without fair sharing (one organization may hold
    # the whole pool; waits of a minute): how tally behaved before. Rate limits are set
    # beyond any client here in both: what is measured is the database share.
    configs = {
        "fair (default)": {},
        "uncapped (before)": {"TALLY_DB_ORG_CONCURRENCY": "8", "TALLY_DB_ACQUIRE_TIMEOUT": "60"},
    }
    if args.only_default:
        del configs["uncapped (before)"]
    results: dict[str, dict[str, object]] = {}
    api_rss = 0.0
    try:
        for config, overrides in configs.items():
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            log = Path(tempfile.mkdtemp()) / "api.log"
            api = start_tally(
                "api",
                {
                    "TALLY_DATABASE_URL": dsn,
                    "TALLY_HTTP_PORT": str(port),
                    "TALLY_HTTP_HOST": "127.0.0.1",
                    "TALLY_DB_POOL_MAX": "8",
                    "TALLY_DB_POOL_MIN": "8",
                    **UNLIMITED,
                    **overrides,
                },
                log,
                port,
            )
            try:
                await wait_ready(f"{base}/healthz", api)
                victim_url = f"{base}/v1/customers/{retrieve_id}"
                for name, path in scenarios:
                    await settle(pool)
                    child = None
                    if path is not None:
                        child = await abusing(base + path, big_key, args.abusers, ABUSE_LEAD + args.duration)
                        await asyncio.sleep(ABUSE_LEAD)  # a benchmark's warm-up, not a wait for a condition
                    rate = await victim(victim_url, mid_key, args.connections, args.duration)
                    entry: dict[str, object] = {"victim_retrieve": rate.as_dict()}
                    if child is not None:
                        out, _ = await child.communicate()
                        entry["abuser"] = orjson.loads(out)
                    results[f"{config}: {name}"] = entry
                    print(f"  {config}: {name}: {entry}", file=sys.stderr)
                api_rss = max(api_rss, api.peak_rss_mb())
            finally:
                api.stop()
    finally:
        await pool.close()

    baseline = results[f"fair (default): {scenarios[0][0]}"]["victim_retrieve"]
    rows = []
    for name, entry in results.items():
        v = entry["victim_retrieve"]
        p50_ratio = v["p50_ms"] / baseline["p50_ms"] if baseline["p50_ms"] else None
        p99_ratio = v["p99_ms"] / baseline["p99_ms"] if baseline["p99_ms"] else None
        entry["p50_over_alone"] = None if p50_ratio is None else round(p50_ratio, 2)
        entry["p99_over_alone"] = None if p99_ratio is None else round(p99_ratio, 2)
        abuser = entry.get("abuser")
        served, s503, s429, other = shed(abuser["statuses"]) if abuser else (None, None, None, None)
        entry["abuser_shed"] = {"served": served, "503": s503, "429": s429, "other": other}
        rows.append(
            [
                name,
                v["per_second"],
                v["p50_ms"],
                v["p99_ms"],
                v["errors"],
                entry["p50_over_alone"],
                entry["p99_over_alone"],
                served,
                s503,
                s429,
                other,
            ]
        )
    document = {
        "benchmark": "fairness",
        "customers": args.customers,
        "duration_s": args.duration,
        "victim_connections": args.connections,
        "abusers": args.abusers,
        "machine": machine(),
        "scenarios": results,
        "api_peak_rss_mb": round(api_rss, 1),
    }
    print_table(
        f"Fairness: bench-mid's retrieve while bench-big abuses the API ({args.customers:,} customers, "
        f"victim {args.connections} connections, {args.duration:g}s per scenario)",
        [
            "scenario",
            "victim req/s",
            "p50 ms",
            "p99 ms",
            "victim errors",
            "p50 / alone",
            "p99 / alone",
            "A served",
            "A 503",
            "A 429",
            "A other",
        ],
        rows,
    )
    write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
