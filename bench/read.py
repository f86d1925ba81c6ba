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
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    UNLIMITED,
    Process,
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
from bench.trees import prepare, remove, tally  # noqa: E402
from service.api.compat import flexprice, public, respan, v0  # noqa: E402
from service.api.customers import canonical_shape  # noqa: E402
from service.domain.listing import CustomerFilter, ListQuery, Position, Sort  # noqa: E402
from service.infra.migrate import migrate  # noqa: E402
from service.store import auth  # noqa: E402
from service.store.customers import _get_sql  # noqa: E402
from service.store.listing import list_sql  # noqa: E402
from service.store.rendering import Shape

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


def wrk(url: str, key: str, duration: float, connections: int, headers: dict[str, str] | None = None) -> Rate:
    """requests/s and latency percentiles from wrk (Debian package 'wrk')."""
    sent = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency"]
        + [arg for name, value in sent.items() for arg in ("-H", f"{name}: {value}")]
        + [url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return _parse_wrk(out)


def _parse_wrk(out: str) -> Rate:
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
    parser.add_argument(
        "--before",
        default=",".join(BEFORE),
        help="earlier versions (git refs, comma-separated; '' for none) measured beside this one, each from its own "
        "checkout and its own copy of the dataset",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the FastAPI peer (bench/peer.py)")
    parser.add_argument("--no-mixed", action="store_true", help="skip the mixed dashboard workload")
    parser.add_argument("--no-windows", action="store_true", help="skip the usage-window lists")
    parser.add_argument("--only-mixed", action="store_true", help="only the mixed workload (no scenarios, no windows)")
    parser.add_argument(
        "--only-windows", action="store_true", help="only the usage-window lists (no scenarios, peer or mixed workload)"
    )
    parser.add_argument(
        "--mixed-rate", type=int, default=2000, help="events/s folded during the mixed workload (0: nothing folds)"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    orgs = await load(args.dsn, args.customers, args.reload, database=args.database)
    if args.load_only:
        return 0
    # This version reads a copy of the dataset made as every earlier version's is (migrated,
    # copied, vacuumed): the loaded database itself carries the load's update history.
    _, dsn = await prepare("working", args.database, args.dsn)
    pool = await asyncpg.create_pool(dsn, min_size=8, max_size=8, server_settings={"timezone": "UTC"})
    big = orgs["bench-big"]
    async with pool.acquire() as conn:
        big_size = await conn.fetchval("SELECT count(*) FROM customers WHERE organization_id = $1", big)
        deep = min(500_000, big_size - 100)
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
    sort = Sort("total_cost", descending=True)
    first = ListQuery(big, "prod", sort=sort, limit=50)
    position = Position(deep_row["k"], deep_row["kid"])
    canonical = canonical_shape(False, False)

    def stmts(q: ListQuery, shape: Shape, count: bool = True) -> list[tuple[str, list[object]]]:
        """The statement the API runs for this list (page and count in one round trip)."""
        return [list_sql(q if count else replace(q, count=False), shape)]

    name_q = ListQuery(big, "prod", filter=CustomerFilter(name_contains=last_name), sort=Sort(), limit=50)
    # (name, path — CURSOR is replaced by each API's own cursor to the deep page —, the same
    # SQL straight through asyncpg, the peer's path serving the same rows)
    scenarios: list[tuple[str, str | None, list[tuple[str, list[object]]], str | None]] = [
        (
            "first page, -total_cost",
            "/v1/customers?sort_by=-total_cost&limit=50",
            stmts(first, canonical),
            "/customers?sort_by=-total_cost&limit=50",
        ),
        ("first page, no count (db)", None, stmts(first, canonical, count=False), None),
        (
            "first page, If-None-Match",
            "/v1/customers?sort_by=-total_cost&limit=50",
            stmts(first, canonical),
            None,
        ),
        (
            "500k deep, cursor",
            "/v1/customers?cursor=CURSOR&limit=50",
            stmts(ListQuery(big, "prod", sort=sort, limit=50, position=position), canonical),
            None,
        ),
        (
            "500k deep, offset",
            f"/v1/customers?sort_by=-total_cost&limit=50&offset={deep}",
            stmts(ListQuery(big, "prod", sort=sort, limit=50, offset=deep), canonical),
            f"/customers?sort_by=-total_cost&limit=50&offset={deep}",
        ),
        ("name filter (partial)", f"/v1/customers?name={last_name}&limit=50", stmts(name_q, canonical), None),
        (
            "retrieve",
            f"/v1/customers/{retrieve_id}",
            [(_get_sql(canonical), [big, "prod", retrieve_id])],
            f"/customers/{retrieve_id}",
        ),
        (
            "respan list",
            "/compat/respan/api/users/list/?page=1&page_size=50&sort_by=-total_cost&environment=prod",
            stmts(ListQuery(big, "prod", sort=sort, limit=50), respan.LIST_SHAPE),
            "/customers?sort_by=-total_cost&limit=50",
        ),
        (
            "v0 list",
            "/compat/v0/api/v0/customers?skip=0&take=50",
            stmts(ListQuery(big, "prod", sort=Sort("created_at"), limit=50), v0.SHAPE),
            "/customers?sort_by=created_at&limit=50",
        ),
        (
            "flexprice list",
            "/compat/flexprice/v1/customers?limit=50&offset=0&order=desc",
            stmts(ListQuery(big, "prod", sort=Sort("created_at"), limit=50), flexprice.SHAPES[False]),
            "/customers?sort_by=-created_at&limit=50",
        ),
        (
            "public list",
            "/compat/public/api/public/customers?limit=50&offset=0",
            stmts(ListQuery(big, "prod", sort=Sort("created_at"), limit=50), public.SHAPES[False]),
            "/customers?sort_by=created_at&limit=50",
        ),
    ]

    if args.only_windows:
        args.before, args.no_peer, args.no_mixed = "", True, True
    befores = [ref for ref in args.before.split(",") if ref]
    trees = {ref: await prepare(ref, args.database, args.dsn) for ref in befores}
    # Throughput, not fairness (bench/fairness.py measures that): a closed loop of 32 clients
    # saturates the API by design, and the organizations' cost shares would shed the one
    # measured while another polls.
    api_env = {
        "TALLY_HTTP_HOST": "127.0.0.1",
        "TALLY_DB_POOL_MAX": "8",
        "TALLY_DB_POOL_MIN": "8",
        "TALLY_ORG_SHARE_SECONDS": "0",
        **UNLIMITED,
    }
    logs = Path(tempfile.mkdtemp())
    # Every version's API runs for the whole benchmark, idle but for its turn, so that each
    # scenario is measured on every version back to back. This version runs twice: with the
    # read cache off (what the earlier versions are compared with) and on (the default).
    versions: dict[str, tuple[Path, str, dict[str, str]]] = {
        ref: (tree, tree_dsn, {}) for ref, (tree, tree_dsn) in trees.items()
    }
    versions[THIS] = (ROOT, dsn, {"TALLY_READ_CACHE_MB": "0"})
    versions[THIS_CACHED] = (ROOT, dsn, {})
    apis: dict[str, tuple[Process, int, str]] = {}
    peer: Process | None = None
    peer_port = free_port()
    results: dict[str, dict[str, object]] = {}
    mixed_result: dict[str, object] | None = None
    windows_result: dict[str, object] | None = None
    try:
        for label, (tree, tree_dsn, extra) in versions.items():
            port = free_port()
            process = start_tally(
                "api",
                {**api_env, "TALLY_DATABASE_URL": tree_dsn, "TALLY_HTTP_PORT": str(port), **extra},
                logs / f"api-{label.replace(' ', '-')}.log",
                port,
                tree=tree,
            )
            key = (
                tally(tree, tree_dsn, "keys", "create", "--org", "bench-big", "--scopes", "read")
                .strip()
                .splitlines()[-1]
            )
            await wait_ready(f"http://127.0.0.1:{port}/healthz", process)
            apis[label] = (process, port, key)
        if not args.no_peer:
            peer = await start_peer(dsn, big, peer_port, logs / "peer.log")
        use_wrk = shutil.which("wrk") is not None
        for name, path, statements, peer_path in [] if args.only_mixed or args.only_windows else scenarios:
            await settle(pool)
            # Offsets 500k deep take ~0.5 s each: a shorter run says as much.
            duration = args.duration if "offset" not in name else max(3.0, args.duration / 3)
            db = await db_rate(pool, statements, duration, args.connections)
            entry: dict[str, object] = {"db": db.as_dict()}
            if path is not None:
                measured: dict[str, dict[str, object]] = {}
                for label, (_, port, key) in apis.items():
                    url = f"http://127.0.0.1:{port}{path}"
                    if "CURSOR" in url:
                        url = url.replace("CURSOR", await deep_cursor(port, key, deep))
                    headers = {}
                    if "If-None-Match" in name:
                        tag = await etag_of(url, key)
                        if tag is None:
                            continue  # a version without ETags
                        headers["If-None-Match"] = tag
                    await settle(pool)
                    rate = (
                        wrk(url, key, duration, args.connections, headers)
                        if use_wrk
                        else await python_load(url, key, duration, args.connections)
                    )
                    measured[label] = rate.as_dict()
                entry["api"] = measured
                this = measured[THIS]["per_second"]
                entry["this_over_db"] = _ratio(this, db.per_second)
                for ref in befores:
                    if ref in measured:
                        entry[f"this_over_{ref}"] = _ratio(this, measured[ref]["per_second"])
            if peer is not None and peer_path is not None:
                await settle(pool)
                url = f"http://127.0.0.1:{peer_port}{peer_path}"
                rate = (
                    wrk(url, "", duration, args.connections)
                    if use_wrk
                    else await python_load(url, "", duration, args.connections)
                )
                entry["peer"] = rate.as_dict()
                entry["this_over_peer"] = _ratio(entry["api"][THIS]["per_second"], rate.per_second)
                entry["cached_over_peer"] = _ratio(entry["api"][THIS_CACHED]["per_second"], rate.per_second)
            results[name] = entry
            print(f"  {name}: {entry}", file=sys.stderr)
        if not args.no_windows and not args.only_mixed:
            windows_result = await windows(pool, big, apis[THIS], args, use_wrk)
        if not args.no_mixed and not use_wrk:
            print("the mixed workload needs wrk (apt-get install wrk): skipped", file=sys.stderr)
        elif not args.no_mixed:
            mixed_result = await mixed(
                pool,
                dsn,
                orgs,
                {label: apis[label] for label in (THIS, THIS_CACHED)},
                peer_port if peer else None,
                args,
                logs,
            )
        api_rss = {label: round(process.peak_rss_mb(), 1) for label, (process, _, _) in apis.items()}
    finally:
        for process, _, _ in apis.values():
            process.stop()
        if peer is not None:
            peer.stop()
        for tree, _ in trees.values():
            remove(tree)
        await pool.close()

    derived = {
        "count_overhead": _ratio(
            results["first page, no count (db)"]["db"]["per_second"],
            results["first page, -total_cost"]["db"]["per_second"],
            minus_one=True,
        )
        if results
        else None,
        "api_peak_rss_mb": api_rss,
        "load_generator": "wrk" if shutil.which("wrk") else "python (may be the bottleneck)",
    }
    document = {
        "benchmark": "read",
        "customers": args.customers,
        "connections": args.connections,
        "duration_s": args.duration,
        "versions": {
            THIS: "this tree, read cache off",
            THIS_CACHED: "this tree, read cache on (default)",
            **{ref: f"git {ref}, its own checkout and database" for ref in befores},
        },
        "machine": machine(),
        "scenarios": results,
        "mixed": mixed_result,
        "windows": windows_result,
        "derived": derived,
    }
    report(results, befores, mixed_result, derived, args)
    if windows_result:
        print_table(
            f"Usage windows: {windows_result['customers']:,} customers with {windows_result['daily_rows']:,} daily rows"
            f" (this version, cache off; the roll took {windows_result['roll_seconds']} s), req/s",
            ["list", "req/s", "p50 ms", "p99 ms", "errors", "/ lifetime"],
            [
                [name, m["per_second"], m["p50_ms"], m["p99_ms"], m["errors"], m.get("over_lifetime")]
                for name, m in windows_result["lists"].items()
            ],
        )
    write_json(args.json, document)
    return 0


# Daily usage for the window lists: each customer of the organization active on a few of the
# last 35 days (bench-big, after the lifetime scenarios, which read its rows as loaded).
DAILY_LOAD = """
INSERT INTO daily_usage (organization_id, customer_id, day, requests, prompt_tokens, completion_tokens, total_tokens,
                         cost, latency_sum, latency_count, ttft_sum, ttft_count)
SELECT c.organization_id, c.id, current_date - d.n, r, r * 300, r * 120, r * 420,
       round((r * random() / 50)::numeric, 6), r * random() * 2, r, r * random(), r
FROM customers c
CROSS JOIN LATERAL (SELECT DISTINCT (random() * 34)::int + 0 * hashtext(c.id::text) AS n
                    FROM generate_series(1, $2)) d
CROSS JOIN LATERAL (SELECT 1 + floor(power(random(), -1.2))::int AS r) q
WHERE c.organization_id = $1
ON CONFLICT DO NOTHING
"""


async def windows(
    pool: asyncpg.Pool, organization: UUID, api: tuple[Process, int, str], args: argparse.Namespace, use_wrk: bool
) -> dict[str, object]:
    """The organization's lifetime list by -total_cost beside the same list ranked inside the
    current calendar month, the last 7 and the last 30 days, first page and a cursor page
    each: read from the maintained window sums (the organization rolled to today), and, in
    the same run, aggregated from the daily rows (its mark removed, as before a roll)."""
    from service.store import windows as maintained

    async with pool.acquire() as conn:
        # Loaded unless it is there: several days per customer. A few daily rows are not the
        # dataset: the mixed workload folds events into this organization, and a later run
        # on the same database would otherwise rank windows over those alone.
        days = await conn.fetchval("SELECT count(*) FROM daily_usage WHERE organization_id = $1", organization)
        people = await conn.fetchval("SELECT count(*) FROM customers WHERE organization_id = $1", organization)
        if days < people:
            print("loading daily usage for the window lists", file=sys.stderr)
            await conn.execute(DAILY_LOAD, organization, 6)
        today = await conn.fetchval(
            "SELECT tally_local_day(time_zone, now()) FROM organizations WHERE id = $1", organization
        )
        started = time.monotonic()
        rolled = await maintained.roll(conn, organization, today)
        roll_seconds = round(time.monotonic() - started, 1)
        print(
            f"rolled {rolled.customers:,} customers ({rolled.changed:,} changed) in {roll_seconds} s", file=sys.stderr
        )
        await conn.execute("VACUUM ANALYZE daily_usage")
        await conn.execute("VACUUM ANALYZE customer_usage")
        mark = await conn.fetchval("SELECT day FROM usage_window_marks WHERE organization_id = $1", organization)
        rows = await conn.fetchval("SELECT count(*) FROM daily_usage WHERE organization_id = $1", organization)
        customers = await conn.fetchval("SELECT count(*) FROM customers WHERE organization_id = $1", organization)
    _, port, key = api
    lists = {
        "lifetime": "",
        "this month": f"&usage_from={today.replace(day=1)}&usage_to={today}",
        "last 7 days": f"&usage_from={today - timedelta(days=6)}&usage_to={today}",
        "last 30 days": f"&usage_from={today - timedelta(days=29)}&usage_to={today}",
    }
    out: dict[str, dict[str, object]] = {}
    for way in ("maintained", "aggregated"):
        async with pool.acquire() as conn:
            if way == "aggregated":  # as before the roll: the window's daily rows summed per request
                await conn.execute("DELETE FROM usage_window_marks WHERE organization_id = $1", organization)
            else:
                await conn.execute(maintained.MARK, organization, mark)
        for name, window in lists.items():
            if way == "aggregated" and not window:
                continue
            base = f"http://127.0.0.1:{port}/v1/customers?sort_by=-total_cost&limit=50{window}"
            cursor = await page_cursor(base, key)
            for page, url in (("first page", base), ("cursor page", f"{base}&cursor={cursor}")):
                label = f"{name}, {page}" + ("" if not window else f" ({way})")
                await settle(pool)
                rate = (
                    wrk(url, key, args.duration, args.connections)
                    if use_wrk
                    else await python_load(url, key, args.duration, args.connections)
                )
                out[label] = {**rate.as_dict(), "page": page}
                print(f"  window {label}: {out[label]}", file=sys.stderr)
    for entry in out.values():
        lifetime = out[f"lifetime, {entry['page']}"]["per_second"]
        entry["over_lifetime"] = _ratio(entry["per_second"], lifetime)  # type: ignore[arg-type]
    return {"customers": customers, "daily_rows": rows, "roll_seconds": roll_seconds, "lists": out}


async def page_cursor(url: str, key: str) -> str:
    """The next_cursor of the list's first page (the cursor page is the second); a 503 (the
    organization's turns still held by the requests a load generator gave up on) is retried."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}, timeout=timeout) as session:
        for _ in range(30):
            async with session.get(url) as r:
                body = await r.json()
            if r.status == 200:
                return str(body["next_cursor"])
            if r.status != 503:
                break
            await asyncio.sleep(2)
    raise RuntimeError(f"{url}: {r.status} {body}")


THIS, THIS_CACHED = "this", "this, cached"
# The version before the usage table split, and the one before reads stopped depending on
# statistics (the "before" figures were measured on the first).
BEFORE = ("746fb55",)


def _ratio(a: float | None, b: float | None, minus_one: bool = False) -> float | None:
    if not a or not b:
        return None
    return round(a / b - (1 if minus_one else 0), 3)


async def deep_cursor(port: int, key: str, deep: int) -> str:
    """The API's own cursor to the page ``deep`` rows down (-total_cost): the next_cursor of
    the page before it (each version encodes cursors its own way)."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v1/customers?sort_by=-total_cost&limit=50&offset={deep - 50}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session, session.get(url) as r:
        body = await r.json()
    return str(body["next_cursor"])


async def etag_of(url: str, key: str) -> str | None:
    import aiohttp

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session, session.get(url) as r:
        await r.read()
        return r.headers.get("ETag")


async def start_peer(dsn: str, organization: UUID, port: int, log: Path) -> Process:
    from bench import peer

    conn = await asyncpg.connect(dsn)
    try:
        await peer.prepare(conn, organization)
    finally:
        await conn.close()
    env = {**os.environ, "PEER_DATABASE_URL": dsn, "PEER_ORGANIZATION": str(organization)}
    handle = log.open("wb")
    popen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.peer:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env=env,
        cwd=ROOT,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    process = Process(popen, log, port)
    await wait_ready(f"http://127.0.0.1:{port}/customers?limit=1", process)
    return process


MIXED_SCRIPT = """
local requests = {}
local i = 0
init = function(args)
  for _, r in ipairs(REQUESTS) do
    table.insert(requests, wrk.format("GET", r[1], r[2]))
  end
end
request = function()
  i = i % #requests + 1
  return requests[i]
end
"""


def _lua(requests: list[tuple[str, dict[str, str]]]) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    rows = ",\n".join(
        "{" + q(path) + ", {" + ", ".join(f"[{q(k)}] = {q(v)}" for k, v in headers.items()) + "}}"
        for path, headers in requests
    )
    return "REQUESTS = {\n" + rows + "\n}\n" + MIXED_SCRIPT


async def wrk_script(base: str, script: str, duration: float, connections: int) -> Rate:
    """wrk running a Lua script, awaited (the event loop goes on publishing meanwhile)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        process = await asyncio.create_subprocess_exec(
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "-s",
            f.name,
            base,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"wrk exited with {process.returncode}")
    finally:
        os.unlink(f.name)
    return _parse_wrk(out.decode())


async def _views(
    port: int, keys: dict[str, str], retrieve: dict[str, str], names: dict[str, str], conditional_share: int
) -> list[tuple[str, dict[str, str]]]:
    """The dashboard's views, for each organization: three sorts, an offset page, a name and a
    status filter, a retrieve, a usage series and three vendor lists; every ``conditional_share``-th
    request revalidates with the ETag the view had when the run began."""
    import aiohttp

    paths = [
        "/v1/customers?sort_by=-total_cost&limit=50",
        "/v1/customers?sort_by=-last_active&limit=50",
        "/v1/customers?sort_by=created_at&limit=25",
        "/v1/customers?sort_by=-total_cost&limit=50&offset=1000",
        "/v1/customers?name={name}&limit=50",
        "/v1/customers?status=active&sort_by=-number_of_requests&limit=50",
        "/v1/customers/{id}",
        "/v1/customers/{id}/usage",
        "/compat/respan/api/users/list/?page=1&page_size=50&sort_by=-total_cost&environment=prod",
        "/compat/v0/api/v0/customers?skip=0&take=50",
        "/compat/flexprice/v1/customers?limit=50&offset=0&order=desc",
    ]
    requests: list[tuple[str, dict[str, str]]] = []
    async with aiohttp.ClientSession() as session:
        n = 0
        for org, key in keys.items():
            auth_header = {"Authorization": f"Bearer {key}"}
            for template in paths:
                path = template.replace("{id}", retrieve[org]).replace("{name}", names[org])
                async with session.get(f"http://127.0.0.1:{port}{path}", headers=auth_header) as r:
                    if r.status != 200:
                        raise RuntimeError(f"{path}: {r.status} {await r.text()}")
                    tag = r.headers.get("ETag")
                n += 1
                headers = dict(auth_header)
                if tag and n % conditional_share == 0:
                    headers["If-None-Match"] = tag
                requests.append((path, headers))
    return requests


async def mixed(
    pool: asyncpg.Pool,
    dsn: str,
    orgs: dict[str, UUID],
    apis: dict[str, tuple[Process, int, str]],
    peer_port: int | None,
    args: argparse.Namespace,
    logs: Path,
) -> dict[str, object]:
    """Many clients polling a set of views (several sorts, filters, pages, three organizations,
    a third of the requests conditional) while a consumer folds events at ``--mixed-rate``:
    this version with the read cache off and on, and the peer serving the views it has."""
    import aio_pika
    import orjson

    from bench.ingest import AMQP_URL, generate
    from service.infra.broker import Names, declare

    measured_orgs = ("bench-big", "bench-mid", "bench-small")
    keys: dict[str, dict[str, str]] = {label: {} for label in apis}
    retrieve: dict[str, str] = {}
    searches: dict[str, str] = {}
    ranges: dict[str, tuple[int, int]] = {}
    async with pool.acquire() as conn:
        for name in measured_orgs:
            for label in apis:
                keys[label][name] = (await auth.create_key(conn, name, ("read",), name="bench-mixed")).key
            low, high = await conn.fetchrow(
                "SELECT min(substr(customer_identifier, 6)::bigint), max(substr(customer_identifier, 6)::bigint)"
                " FROM customers WHERE organization_id = $1",
                orgs[name],
            )
            ranges[name] = (low, high)
            retrieve[name] = f"user_{low + 7}"
            # A dashboard's search box: one realistic last name (tens of matches).
            searches[name] = await conn.fetchval(
                "SELECT lower(split_part(name, ' ', 2)) FROM customers WHERE organization_id = $1 LIMIT 1",
                orgs[name],
            )
    names = Names(f"bench_read_mixed_{os.getpid()}")
    consumer_port = free_port()
    consumer = start_tally(
        "consume",
        {
            "TALLY_DATABASE_URL": dsn,
            "TALLY_AMQP_NAMESPACE": names.namespace,
            "TALLY_CONSUMER_HTTP_PORT": str(consumer_port),
            "TALLY_HTTP_HOST": "127.0.0.1",
        },
        logs / "consumer.log",
        consumer_port,
    )
    await wait_ready(f"http://127.0.0.1:{consumer_port}/healthz", consumer)
    connection = await aio_pika.connect(AMQP_URL)
    stop = asyncio.Event()
    published = 0

    async def publish() -> None:
        """Events for the measured organizations' existing customers, 100 per message, at the rate."""
        nonlocal published
        if args.mixed_rate <= 0:
            return  # the mix with nothing folding: what the fold's commits and load add, by difference
        channel = await connection.channel(publisher_confirms=False)
        topology = await declare(connection, channel, names)
        per_message, seed = 100, int(time.time())
        interval = per_message / args.mixed_rate
        next_at = time.perf_counter()
        while not stop.is_set():
            name = measured_orgs[published // per_message % len(measured_orgs)]
            low, high = ranges[name]
            batch = generate(str(orgs[name]), per_message, min(high - low + 1, 5000), seed=seed + published)
            for event in batch:
                event["subject"] = f"user_{low + int(event['subject'][5:])}"
            await topology.events.publish(aio_pika.Message(orjson.dumps(batch)), routing_key="usage.recorded")
            published += per_message
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    async def cache_outcomes(port: int) -> dict[str, float]:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
        return {
            m[1]: float(m[2])
            for m in re.finditer(r'^tally_read_cache_total\{outcome="(\w+)"\} ([\d.e+]+)$', text, re.M)
        }

    result: dict[str, object] = {"fold_rate_target": args.mixed_rate, "organizations": list(measured_orgs)}
    publisher = asyncio.create_task(publish())
    try:
        await asyncio.sleep(3)  # the fold under way before the first measurement
        for label, (_, port, _) in apis.items():
            views = await _views(port, keys[label], retrieve, searches, conditional_share=3)
            before = await cache_outcomes(port)
            start_published, started = published, time.perf_counter()
            rate = await wrk_script(f"http://127.0.0.1:{port}", _lua(views), args.duration * 2, args.connections)
            after = await cache_outcomes(port)
            outcomes = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            served = sum(outcomes.values())
            entry = rate.as_dict()
            entry["views"] = len(views)
            entry["events_per_second"] = round((published - start_published) / (time.perf_counter() - started))
            entry["cache"] = outcomes
            # Answered without a read of their own: from memory, or by a read under way for the same response.
            answered = outcomes.get("hit", 0) + outcomes.get("shared", 0)
            entry["cache_hit_rate"] = round(answered / served, 3) if served else None
            result[label] = entry
            print(f"  mixed, {label}: {entry}", file=sys.stderr)
        if peer_port is not None:
            peer_views = [
                ("/customers?sort_by=-total_cost&limit=50", {}),
                ("/customers?sort_by=created_at&limit=25", {}),
                ("/customers?sort_by=-total_cost&limit=50&offset=1000", {}),
                ("/customers?sort_by=-created_at&limit=50", {}),
                (f"/customers/{retrieve['bench-big']}", {}),
            ]
            started, start_published = time.perf_counter(), published
            rate = await wrk_script(
                f"http://127.0.0.1:{peer_port}", _lua(peer_views), args.duration * 2, args.connections
            )
            entry = rate.as_dict()
            entry["views"] = len(peer_views)
            entry["events_per_second"] = round((published - start_published) / (time.perf_counter() - started))
            entry["note"] = "the views it can serve: two sorts each way, an offset page, a retrieve; one organization"
            result["peer"] = entry
            print(f"  mixed, peer: {entry}", file=sys.stderr)
    finally:
        stop.set()
        await publisher
        await connection.close()
        consumer.stop()
    return result


def report(
    results: dict[str, dict[str, object]],
    befores: list[str],
    mixed_result: dict[str, object] | None,
    derived: dict[str, object],
    args: argparse.Namespace,
) -> None:
    labels = [*befores, THIS, THIS_CACHED]
    rows = []
    for name, entry in results.items():
        apis = entry.get("api", {})
        peer = entry.get("peer", {})
        rows.append(
            [name, entry["db"]["per_second"]]
            + [apis.get(label, {}).get("per_second") for label in labels]
            + [peer.get("per_second")]
            + [entry.get(f"this_over_{ref}") for ref in befores]
            + [entry.get("this_over_db"), entry.get("this_over_peer"), entry.get("cached_over_peer")]
        )
    if rows:
        print_table(
            f"Reads: {args.customers:,} customers, {args.connections} connections, {args.duration:g}s per scenario"
            " (req/s)",
            [
                "scenario",
                "db q/s",
                *labels,
                "peer",
                *[f"this/{ref}" for ref in befores],
                "this/db",
                "this/peer",
                "cached/peer",
            ],
            rows,
        )
    if mixed_result:
        rows = [
            [
                label,
                m["per_second"],
                m["p50_ms"],
                m["p99_ms"],
                m["errors"],
                m.get("cache_hit_rate"),
                m["events_per_second"],
            ]
            for label, m in mixed_result.items()
            if isinstance(m, dict)
        ]
        print_table(
            f"Mixed dashboard workload while folding ~{args.mixed_rate:,} events/s, {args.connections} connections",
            ["server", "req/s", "p50 ms", "p99 ms", "errors", "cache hit rate", "events/s folded"],
            rows,
        )
    overhead = derived["count_overhead"]
    if overhead is not None:
        print(f"\ncount() adds {overhead:.0%} to a first-page list (db)")
    print(f"API peak RSS (MB): {derived['api_peak_rss_mb']}")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
