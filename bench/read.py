"""Read benchmark: M customers (default 1M) in several organizations, the running API
driven by wrk at 32 connections, beside the same SQL run straight through asyncpg at the
same concurrency (the database's own limit), and the ratio of the two.

    python bench/read.py [--customers 1000000] [--duration 10] [--json bench/results/read.json]

The dataset is loaded once into the database ``tally_bench_read`` and reused while its
size matches (``--reload`` forces a fresh load).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from uuid import UUID

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    UNLIMITED,
    Rate,
    closed_loop,
    free_port,
    machine,
    print_table,
    start_tally,
    wait_ready,
    with_database,
    write_json,
)
from service.api.compat import flexprice, public, respan, v0  # noqa: E402
from service.api.customers import canonical_shape  # noqa: E402
from service.domain.listing import CursorCodec, CustomerFilter, ListQuery, Position, Sort  # noqa: E402
from service.infra.migrate import migrate  # noqa: E402
from service.store import auth  # noqa: E402
from service.store.customers import _get_sql  # noqa: E402
from service.store.listing import Shape, list_sql  # noqa: E402

DATABASE = "tally_bench_read"
# Organization sizes as shares of M: one big tenant (the deep-page scenarios need >500k
# rows in one organization), a few smaller ones.
SHARES = (("bench-big", 0.60), ("bench-mid", 0.25), ("bench-small", 0.10), ("bench-tiny", 0.05))

LOAD = """
INSERT INTO customers (organization_id, environment, customer_identifier, name, email, status, metadata,
                       total_budget, period_budget, budget_duration, created_at, updated_at)
SELECT $1, 'prod', 'user_' || g,
       -- Realistically diverse names (~600 first x ~14k last names) built from syllables:
       -- trigram search cost depends on how common a name's trigrams are.
       initcap(syl[1 + (g * 7) % 24] || syl[1 + (g * 13) % 23]) || ' ' ||
       initcap(syl[1 + (g * 17) % 24] || syl[1 + (g * 29) % 23] || syl[1 + (g * 31) % 25]),
       'user' || g || '@example.com',
       (ARRAY['active','active','active','active','active','active','draft','blacklisted','deactivated',
              'archived'])[1 + g % 10],
       jsonb_build_object('plan_tier', (ARRAY['free','growth','enterprise'])[1 + g % 3]),
       CASE WHEN g % 7 = 0 THEN 1000 END, CASE WHEN g % 5 = 0 THEN 100 END,
       CASE WHEN g % 5 = 0 THEN 'monthly' END, fs, fs
FROM (
    SELECT g, ARRAY['ka','lo','mi','ne','ra','si','to','va','be','da','fi','gu','ha','jo','ke','lu','ma','no',
                    'pe','ri','sa','te','vi','zo','an'] AS syl,
           now() - random() * interval '400 days' AS fs
    FROM generate_series($2::bigint, $3::bigint) g
) s
"""

# The usage of the customers LOAD just made (their rows in customer_usage come from its trigger).
LOAD_USAGE = """
UPDATE customer_usage u SET
    first_seen = s.fs, last_active = s.fs + random() * interval '30 days', active_days = s.ad,
    number_of_requests = s.req, prompt_tokens = s.req * 300, completion_tokens = s.req * 120,
    total_tokens = s.req * 420, total_cost = round((s.req * (0.0005 + random() * 0.02))::numeric, 6),
    latency_sum = s.req * (0.3 + random() * 2), latency_count = s.req, ttft_sum = s.req * 0.4, ttft_count = s.req
FROM (
    SELECT c.organization_id, c.id, c.created_at AS fs, 1 + floor(random() * 60)::int AS ad,
           -- Heavy-tailed usage: most customers make a few requests, a few make very many.
           least(1 + floor(power(random(), -1.2))::bigint, 10000000) AS req
    FROM customers c
    WHERE c.organization_id = $1 AND c.customer_identifier = ANY(
        SELECT 'user_' || g FROM generate_series($2::bigint, $3::bigint) g)
) s
WHERE u.organization_id = s.organization_id AND u.id = s.id
"""


async def load(
    dsn: str,
    customers: int,
    reload: bool,
    database: str = DATABASE,
    shares: tuple[tuple[str, float], ...] = SHARES,
) -> dict[str, UUID]:
    """Create, migrate and fill the benchmark database (skipped when already filled):
    ``customers`` in all, each organization of ``shares`` its share of them."""
    admin = await asyncpg.connect(with_database(dsn, "postgres"))
    try:
        if reload:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await admin.close()
    bench_dsn = with_database(dsn, database)
    await migrate(bench_dsn, Path(__file__).resolve().parent.parent / "migrations")
    conn = await asyncpg.connect(bench_dsn)
    try:
        existing = await conn.fetchval("SELECT count(*) FROM customers")
        orgs: dict[str, UUID] = {}
        for name, _ in shares:
            orgs[name] = await conn.fetchval("SELECT id FROM organizations WHERE name = $1", name) or (
                await auth.create_organization(conn, name)
            )
        if existing == customers:
            print(f"reusing {existing:,} customers in {database}", file=sys.stderr)
            return orgs
        await conn.execute("TRUNCATE customers CASCADE")
        start = 1
        started = time.perf_counter()
        for name, share in shares:
            count = round(customers * share)
            step = 100_000
            for low in range(start, start + count, step):
                high = min(low + step, start + count) - 1
                async with conn.transaction():
                    await conn.execute(LOAD, orgs[name], low, high)
                    await conn.execute(LOAD_USAGE, orgs[name], low, high)
                done = high - 1
                print(
                    f"\rloading customers {done:,}/{customers:,} ({done / (time.perf_counter() - started):,.0f}/s)",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            start += count
        print(file=sys.stderr)
        # customer_usage too: LOAD_USAGE rewrote every row its trigger made.
        await conn.execute("VACUUM ANALYZE customers, customer_usage")
        return orgs
    finally:
        await conn.close()


def wrk(url: str, key: str, duration: float, connections: int) -> Rate:
    """requests/s and latency percentiles from wrk (Debian package 'wrk')."""
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {key}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    return Rate(rps, ms("50"), ms("99"), errors)


async def python_load(url: str, key: str, duration: float, connections: int) -> Rate:
    """Fallback load generator when wrk is not installed (it may itself be the bottleneck)."""
    import aiohttp

    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}"}, connector=aiohttp.TCPConnector(limit=connections)
    ) as session:

        async def hit() -> None:
            async with session.get(url) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(r.status)

        return await closed_loop(hit, concurrency=connections, duration=duration)


async def db_rate(
    pool: asyncpg.Pool, statements: list[tuple[str, list[object]]], duration: float, connections: int
) -> Rate:
    async def work() -> None:
        async with pool.acquire() as conn:
            for sql, args in statements:
                await conn.fetch(sql, *args)

    return await closed_loop(work, concurrency=connections, duration=duration)


async def settle(pool: asyncpg.Pool, timeout: float = 60) -> None:
    """Wait until the previous scenario's queries have finished in PostgreSQL (a client that
    timed out does not cancel its query), so that no scenario pays for the one before."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'active'"
            " AND pid <> pg_backend_pid()"
        )
        if busy == 0:
            return
        await asyncio.sleep(0.2)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--dsn", default=os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))
    parser.add_argument("--reload", action="store_true", help="drop and reload the dataset")
    parser.add_argument("--database", default=DATABASE, help="the benchmark database (loaded if empty)")
    parser.add_argument("--load-only", action="store_true", help="load the dataset and stop")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    orgs = await load(args.dsn, args.customers, args.reload, database=args.database)
    if args.load_only:
        return 0
    dsn = with_database(args.dsn, args.database)
    pool = await asyncpg.create_pool(dsn, min_size=8, max_size=8, server_settings={"timezone": "UTC"})
    async with pool.acquire() as conn:
        key = (await auth.create_key(conn, "bench-big", ("read",), name="bench")).key
        big = orgs["bench-big"]
        big_size = await conn.fetchval("SELECT count(*) FROM customers WHERE organization_id = $1", big)
        deep = min(500_000, big_size - 100)
        secret = await conn.fetchval("SELECT value FROM instance_secrets WHERE name = 'cursor_hmac'")
        sort = Sort("total_cost", descending=True)
        deep_row = await conn.fetchrow(
            "SELECT total_cost::text AS k, id::text AS kid FROM customer_rows WHERE organization_id = $1"
            " AND environment = 'prod' ORDER BY total_cost DESC, id DESC OFFSET $2 LIMIT 1",
            big,
            deep - 1,
        )
        # A partial-name search for one (realistic) last name, lower-cased: ~40 matches.
        last_name = (
            await conn.fetchval(
                "SELECT split_part(name, ' ', 2) FROM customers WHERE organization_id = $1 LIMIT 1", big
            )
        ).lower()
        retrieve_id = await conn.fetchval(
            "SELECT customer_identifier FROM customer_rows WHERE organization_id = $1 ORDER BY total_cost DESC LIMIT 1",
            big,
        )
    first = ListQuery(big, "prod", sort=sort, limit=50)
    position = Position(deep_row["k"], deep_row["kid"])
    cursor = CursorCodec(secret).encode(first, position)
    canonical = canonical_shape(False, False)

    def stmts(q: ListQuery, shape: Shape, count: bool = True) -> list[tuple[str, list[object]]]:
        """The statement the API runs for this list (page and count in one round trip)."""
        return [list_sql(q if count else replace(q, count=False), shape)]

    name_q = ListQuery(big, "prod", filter=CustomerFilter(name_contains=last_name), sort=Sort(), limit=50)
    scenarios = [
        ("first page, -total_cost", "/v1/customers?sort_by=-total_cost&limit=50", stmts(first, canonical)),
        ("first page, no count (db)", None, stmts(first, canonical, count=False)),
        (
            "500k deep, cursor",
            f"/v1/customers?cursor={cursor}&limit=50",
            stmts(ListQuery(big, "prod", sort=sort, limit=50, position=position), canonical),
        ),
        (
            "500k deep, offset",
            f"/v1/customers?sort_by=-total_cost&limit=50&offset={deep}",
            stmts(ListQuery(big, "prod", sort=sort, limit=50, offset=deep), canonical),
        ),
        ("name filter (partial)", f"/v1/customers?name={last_name}&limit=50", stmts(name_q, canonical)),
        ("retrieve", f"/v1/customers/{retrieve_id}", [(_get_sql(canonical), [big, "prod", retrieve_id])]),
        (
            "respan list",
            "/compat/respan/api/users/list/?page=1&page_size=50&sort_by=-total_cost&environment=prod",
            stmts(ListQuery(big, "prod", sort=sort, limit=50), respan.LIST_SHAPE),
        ),
        (
            "v0 list",
            "/compat/v0/api/v0/customers?skip=0&take=50",
            stmts(ListQuery(big, "prod", sort=Sort("created_at"), limit=50), v0.SHAPE),
        ),
        (
            "flexprice list",
            "/compat/flexprice/v1/customers?limit=50&offset=0&order=desc",
            stmts(ListQuery(big, "prod", sort=Sort("created_at"), limit=50), flexprice.SHAPES[False]),
        ),
        (
            "public list",
            "/compat/public/api/public/customers?limit=50&offset=0",
            stmts(ListQuery(big, "prod", sort=Sort("created_at"), limit=50), public.SHAPES[False]),
        ),
    ]

    port = free_port()
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
        },
        log,
        port,
    )
    results: dict[str, dict[str, object]] = {}
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz", api)
        use_wrk = shutil.which("wrk") is not None
        for name, path, statements in scenarios:
            await settle(pool)
            # Offsets 500k deep take ~0.5 s each: a shorter run says as much.
            duration = args.duration if "offset" not in name else max(3.0, args.duration / 3)
            db = await db_rate(pool, statements, duration, args.connections)
            entry: dict[str, object] = {"db": db.as_dict()}
            if path is not None:
                url = f"http://127.0.0.1:{port}{path}"
                http = (
                    wrk(url, key, duration, args.connections)
                    if use_wrk
                    else await python_load(url, key, duration, args.connections)
                )
                entry["api"] = http.as_dict()
                entry["api_over_db"] = round(http.per_second / db.per_second, 3) if db.per_second else None
            results[name] = entry
            print(f"  {name}: {entry}", file=sys.stderr)
        api_rss = api.peak_rss_mb()
    finally:
        api.stop()
        await pool.close()

    first_page = results["first page, -total_cost"]
    derived = {
        "count_overhead": round(
            results["first page, no count (db)"]["db"]["per_second"] / first_page["db"]["per_second"] - 1,
            3,
        ),
        "deep_cursor_over_first_page_p50": round(
            results["500k deep, cursor"]["api"]["p50_ms"] / first_page["api"]["p50_ms"],
            3,
        ),
        "api_peak_rss_mb": round(api_rss, 1),
        "load_generator": "wrk" if shutil.which("wrk") else "python (may be the bottleneck)",
    }
    document = {
        "benchmark": "read",
        "customers": args.customers,
        "connections": args.connections,
        "duration_s": args.duration,
        "machine": machine(),
        "scenarios": results,
        "derived": derived,
    }
    rows = []
    for name, entry in results.items():
        a, d = entry.get("api", {}), entry["db"]
        rows.append(
            [
                name,
                a.get("per_second"),
                a.get("p50_ms"),
                a.get("p99_ms"),
                a.get("errors"),
                d["per_second"],
                d["p50_ms"],
                d["p99_ms"],
                entry.get("api_over_db"),
            ]
        )
    print_table(
        f"Reads: {args.customers:,} customers, {args.connections} connections, {args.duration:g}s per scenario",
        ["scenario", "api req/s", "p50 ms", "p99 ms", "errors", "db q/s", "db p50", "db p99", "api/db"],
        rows,
    )
    print(
        f"\ncount() adds {derived['count_overhead']:.0%} to a first-page list (db);"
        f" 500k-deep cursor p50 = {derived['deep_cursor_over_first_page_p50']}x the first page;"
        f" API peak RSS {derived['api_peak_rss_mb']} MB"
    )
    write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
