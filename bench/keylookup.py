"""Finding customers by their key: tally's statements (one index probe per key) against the
joins they replaced (the baseline), in one run, on one organization loaded by SQL into a fresh
database, first never analyzed (as after a bulk load on a server whose autovacuum is off or
behind), then analyzed.

    python bench/keylookup.py [--customers 200000] [--keys 20,200,3600] [--repeat 2] [--json …]

The fold's two statements take a batch's keys, half of them new: `INSERT_CUSTOMERS` (a row for
each new key) and `LOCK_CUSTOMERS` (every row locked), each run in a transaction rolled back,
tally's and the baseline's alternately. A retrieve's lookup of one customer is timed the same
way. Each statement's time is from the client; a statement still running after
`--timeout` seconds is cancelled and reported as that. The statements are timed alone: a fold
would also analyze the table before them (`ensure_statistics` in service/store/fold.py), so the
"never analyzed" rows show what the lookups do where nothing has analyzed it yet.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, print_table, with_database, write_json  # noqa: E402
from service.infra.migrate import migrate  # noqa: E402
from service.store.apply import KEYS, has_key  # noqa: E402
from service.store.customers import SELECT_CUSTOMER_ID  # noqa: E402
from service.store.db import columns  # noqa: E402
from service.store.fold import INSERT_CUSTOMERS, LOCK_CUSTOMERS  # noqa: E402

# The baseline: what tally ran before, the batch's keys joined to `customers` and the join
# left to the planner (a hash or merge join over the table, or a probe of any index that
# leads with (organization_id, environment)).
JOIN_INSERT = f"""
INSERT INTO customers (organization_id, environment, customer_identifier, last_event_at)
SELECT k.*, NULL FROM {KEYS}
WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE {has_key("c")})
ON CONFLICT (organization_id, environment, customer_identifier) DO NOTHING
RETURNING organization_id, environment, customer_identifier
"""
JOIN_LOCK = f"""
SELECT c.organization_id, c.environment, c.customer_identifier, c.id
FROM customers c JOIN {KEYS} ON {has_key("c")}
ORDER BY c.organization_id, c.id
FOR UPDATE OF c
"""
PLAIN_LOOKUP = "SELECT id FROM customers WHERE organization_id = $1 AND environment = $2 AND customer_identifier = $3"

LOAD = """
INSERT INTO customers (organization_id, environment, customer_identifier, name, email)
SELECT $1, 'prod', 'user_' || g, 'Name ' || g, 'u' || g || '@example.com' FROM generate_series(1, $2) g
"""

STATEMENTS = {
    "INSERT_CUSTOMERS": (INSERT_CUSTOMERS, JOIN_INSERT),
    "LOCK_CUSTOMERS": (LOCK_CUSTOMERS, JOIN_LOCK),
    "one customer by key": (SELECT_CUSTOMER_ID, PLAIN_LOOKUP),
}


async def timed(conn: asyncpg.Connection, sql: str, args: list[object], timeout: float) -> float | None:
    """Seconds the statement took (in a transaction rolled back), None past ``timeout``."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout * 1000)}")
        started = time.perf_counter()
        try:
            await conn.fetch(sql, *args)
        except asyncpg.QueryCanceledError:
            return None
        return time.perf_counter() - started
    finally:
        await transaction.rollback()


def batch(org: uuid.UUID, customers: int, n: int, rng: random.Random) -> list[tuple[uuid.UUID, str, str]]:
    """``n`` sorted keys, half of existing customers and half new (one key: an existing
    customer's)."""
    keys = {(org, "prod", f"user_{rng.randint(1, customers)}") for _ in range(max(n // 2, 1))}
    keys |= {(org, "prod", f"new_{rng.randrange(10**12)}") for _ in range(n - len(keys))}
    return sorted(keys)


async def measure(
    conn: asyncpg.Connection, org: uuid.UUID, args: argparse.Namespace, stats: str, rng: random.Random
) -> list[dict[str, object]]:
    results = []
    for name, (ours, baseline) in STATEMENTS.items():
        for n in [1] if name == "one customer by key" else args.keys:
            samples: dict[str, list[float | None]] = {"tally": [], "join": []}
            for i in range(args.repeat):
                keys = batch(org, args.customers, n, rng)
                # The key arrays as the fold sends them (every statement here reads them from KEYS).
                params = [org, "prod", keys[0][2]] if n == 1 else columns(keys, KEYS)
                # Alternate which goes first, so neither always finds the other's leftovers.
                order = [("tally", ours), ("join", baseline)][:: 1 if i % 2 == 0 else -1]
                for form, sql in order:
                    samples[form].append(await timed(conn, sql, params, args.timeout))
            row: dict[str, object] = {"statement": name, "keys": n, "statistics": stats}
            for form, values in samples.items():
                done = [v for v in values if v is not None]
                row[f"{form}_ms"] = round(statistics.median(done) * 1000, 2) if len(done) == len(values) else None
            tally_ms, join_ms = row["tally_ms"], row["join_ms"]
            row["join_over_tally"] = round(join_ms / tally_ms, 2) if tally_ms and join_ms else None
            results.append(row)
            print(f"  {stats:14} {name:20} {n:5} keys: tally {tally_ms} ms, join {join_ms} ms", flush=True)
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--keys", default="20,200,3600", help="keys a batch, comma-separated")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each statement in each form")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a statement is cancelled")
    parser.add_argument("--dsn", default=os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    args.keys = [int(k) for k in args.keys.split(",")]

    dsn = with_database(args.dsn, f"tally_bench_keylookup_{secrets.token_hex(3)}")
    await migrate(dsn, Path(__file__).resolve().parent.parent / "migrations")
    admin = await asyncpg.connect(with_database(args.dsn, "postgres"))
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("ALTER TABLE customers SET (autovacuum_enabled = false)")
            org = await conn.fetchval("INSERT INTO organizations (name) VALUES ('bench-keylookup') RETURNING id")
            started = time.perf_counter()
            await conn.execute(LOAD, org, args.customers)
            print(f"loaded {args.customers:,} customers in {time.perf_counter() - started:.1f} s", flush=True)
            rng = random.Random(7)
            results = await measure(conn, org, args, "never analyzed", rng)
            await conn.execute("ANALYZE customers")
            results += await measure(conn, org, args, "analyzed", rng)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
        await admin.close()

    print_table(
        f"Customers found by key, {args.customers:,} in one organization; ms, median of {args.repeat}"
        " (- : cancelled after the timeout)",
        ["statement", "keys", "statistics", "tally (probe per key)", "baseline (join)", "baseline / tally"],
        [
            [r["statement"], r["keys"], r["statistics"], r["tally_ms"], r["join_ms"], r["join_over_tally"]]
            for r in results
        ],
    )
    write_json(
        args.json,
        {"benchmark": "keylookup", "machine": machine(), "args": vars(args), "results": results},
    )


if __name__ == "__main__":
    asyncio.run(main())
