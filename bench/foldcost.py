"""Where a fold batch's time goes: each statement of tally's fold (c) against the three of the
database ceiling with sort indexes (e2) (bench/ingest.py), on the same events, batch by batch,
in one run. Each statement is timed from the client (the round trip included, as the fold
pays it); "Python" is the rest of the batch's time: validation is done before the clock
starts, so it is the fold's own planning and argument encoding.

    python bench/foldcost.py [--events 60000] [--customers 20000] [--profile zipf|spread] [--json …]
    python bench/foldcost.py --models 5     # each event names one of 5 models (and its provider)

Statements are named by the module constant that holds their text (service/store/*.py); the
table lists them by total time, with their share of the batch and milliseconds per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, print_table, with_database, write_json  # noqa: E402
from bench.ingest import (  # noqa: E402
    CEILING_CUSTOMERS,
    CEILING_DAYS,
    CEILING_DEDUPE,
    CEILING_SCHEMA,
    RETENTION,
    SORT_INDEXED,
    _ceiling_batch,
    drop_database,
    generate,
    with_models,
)
from service.domain.events import validate_event  # noqa: E402
from service.infra.migrate import migrate  # noqa: E402
from service.store import alerts, apply, auth, changelog, fold, housekeeping  # noqa: E402

# The statements' names: every upper-case string constant of the store modules the fold uses.
NAMES = {
    value.strip(): f"{module.__name__.rsplit('.', 1)[1]}.{name}"
    for module in (fold, apply, auth, changelog, alerts, housekeeping)
    for name, value in vars(module).items()
    if name.isupper() and isinstance(value, str)
}


def name_of(query: str) -> str:
    return NAMES.get(query.strip()) or " ".join(query.split())[:60]


class TimedConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection that adds each statement's time to ``spent`` (seconds, by name)."""

    spent: dict[str, float]

    def _timed(self, method: str) -> Any:
        inner = getattr(super(), method)

        async def call(query: str, *args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return await inner(query, *args, **kwargs)
            finally:
                self.spent[name_of(query)] += time.perf_counter() - started

        return call

    async def execute(self, query: str, *args: object, **kwargs: Any) -> Any:
        return await self._timed("execute")(query, *args, **kwargs)

    async def fetch(self, query: str, *args: object, **kwargs: Any) -> Any:
        return await self._timed("fetch")(query, *args, **kwargs)

    async def fetchval(self, query: str, *args: object, **kwargs: Any) -> Any:
        return await self._timed("fetchval")(query, *args, **kwargs)

    async def fetchrow(self, query: str, *args: object, **kwargs: Any) -> Any:
        return await self._timed("fetchrow")(query, *args, **kwargs)


async def timed_connection(dsn: str) -> TimedConnection:
    conn: TimedConnection = await asyncpg.connect(
        dsn, server_settings={"timezone": "UTC"}, connection_class=TimedConnection
    )
    conn.spent = defaultdict(float)
    return conn


async def fold_cost(dsn: str, events: list[dict], batch_size: int) -> tuple[dict[str, float], float, int]:
    """Per statement seconds, the whole time, and the number of batches of tally's fold."""
    now = datetime.now(UTC)
    validated = [validate_event(e, now) for e in events]
    # The validated events are this benchmark's input, held for the whole run (a consumer holds
    # only its prefetch): out of the garbage collector's reach, or its full collections walk
    # them all and their time shows up as the fold's (measured: a fifth of "Python").
    gc.collect()
    gc.freeze()
    conn = await timed_connection(dsn)
    try:
        started = time.perf_counter()
        batches = 0
        for i in range(0, len(validated), batch_size):
            await fold.fold(conn, validated[i : i + batch_size], retention=RETENTION)
            batches += 1
        return dict(conn.spent), time.perf_counter() - started, batches
    finally:
        gc.unfreeze()
        await conn.close()


async def ceiling_cost(dsn: str, org: object, events: list[dict], batch_size: int) -> tuple[dict[str, float], float]:
    """The same for (e2): the ceiling with one index per usage sort field."""
    batches = [_ceiling_batch(org, events[i : i + batch_size]) for i in range(0, len(events), batch_size)]
    t = "ceiling_ix"
    conn = await timed_connection(dsn)
    try:
        await conn.execute(CEILING_SCHEMA.format(t=t))
        for i, expr in enumerate(SORT_INDEXED):
            await conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_sort_{i} ON {t}_customers (org, {expr}, customer)")
        conn.spent.clear()
        named = [
            (CEILING_DEDUPE.format(t=t), "e2.dedupe"),
            (CEILING_CUSTOMERS.format(t=t), "e2.customers"),
            (CEILING_DAYS.format(t=t), "e2.days"),
        ]
        NAMES.update({sql.strip(): label for sql, label in named})
        started = time.perf_counter()
        for dedupe, customers, days in batches:
            async with conn.transaction():
                await conn.fetch(named[0][0], *dedupe)
                await conn.execute(named[1][0], *customers)
                await conn.execute(named[2][0], *days)
        return dict(conn.spent), time.perf_counter() - started
    finally:
        await conn.close()


def rows_of(spent: dict[str, float], total: float, batches: int) -> list[list[object]]:
    rows: list[list[object]] = [
        [name, round(seconds * 1000 / batches, 2), round(seconds / total, 3)]
        for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1])
    ]
    rest = total - sum(spent.values())
    rows.append(["(Python and the client between statements)", round(rest * 1000 / batches, 2), round(rest / total, 3)])
    return rows


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--profile", choices=["zipf", "spread"], default="zipf")
    parser.add_argument("--fold-batch", type=int, default=4000, help="events per transaction, as bench/ingest.py")
    parser.add_argument("--models", type=int, default=0, help="each event names one of this many models")
    parser.add_argument("--dsn", default=os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    dsn = with_database(args.dsn, f"tally_bench_foldcost_{secrets.token_hex(3)}")
    await migrate(dsn, Path(__file__).resolve().parent.parent / "migrations")
    try:
        conn = await asyncpg.connect(dsn)
        for org in ("bench-fold", "bench-ceiling-ix"):
            await auth.create_organization(conn, org)
        indexed_org = await conn.fetchval("SELECT id FROM organizations WHERE name = 'bench-ceiling-ix'")
        await conn.close()
        events = generate("bench-fold", args.events, args.customers, seed=3, profile=args.profile)
        if args.models:
            events = with_models(events, "bench-fold", args.models, seed=3)
        fold_spent, fold_total, batches = await fold_cost(dsn, events, args.fold_batch)
        ceiling_spent, ceiling_total = await ceiling_cost(
            dsn,
            indexed_org,
            generate("bench-ceiling-ix", args.events, args.customers, seed=3, profile=args.profile),
            args.fold_batch,
        )
    finally:
        await drop_database(args, dsn)

    title = f"{args.events:,} events over {args.customers:,} customers ({args.profile}), {args.fold_batch} per batch"
    if args.models:
        title += f", one of {args.models} models each (the ceiling's events name none)"
    print_table(
        f"(c) tally's fold: {args.events / fold_total:,.0f} events/s — {title}",
        ["statement", "ms per batch", "share"],
        rows_of(fold_spent, fold_total, batches),
    )
    print_table(
        f"(e2) ceiling with sort indexes: {args.events / ceiling_total:,.0f} events/s — same events",
        ["statement", "ms per batch", "share"],
        rows_of(ceiling_spent, ceiling_total, batches),
    )
    print(f"\n(c) / (e2): {ceiling_total / fold_total:.3f}")
    write_json(
        args.json,
        {
            "benchmark": "foldcost",
            "machine": machine(),
            "args": vars(args),
            "fold": {
                "events_per_second": round(args.events / fold_total, 1),
                "ms_per_batch": {k: round(v * 1000 / batches, 3) for k, v in fold_spent.items()},
                "batches": batches,
            },
            "ceiling_e2": {
                "events_per_second": round(args.events / ceiling_total, 1),
                "ms_per_batch": {k: round(v * 1000 / batches, 3) for k, v in ceiling_spent.items()},
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
