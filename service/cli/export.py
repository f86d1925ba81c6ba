"""``tally export``: an organization's customers to a file (or standard output) as NDJSON or
CSV, the same rows as ``GET /v1/customers/export`` (service/api/export.py), with progress on
standard error."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from datetime import date
from pathlib import Path

from service.api.customers import canonical_shape
from service.api.export import PAGE, csv_columns, encode, header
from service.cli.common import with_connection
from service.domain.listing import CustomerFilter, ListQuery
from service.domain.vocabulary import ENVIRONMENTS
from service.infra.settings import Settings
from service.store import auth
from service.store import customers as core
from service.store.db import Connection
from service.store.listing import count_sql

# Seconds between progress lines.
PROGRESS_EVERY = 0.5


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = commands.add_parser("export", help="an organization's customers as NDJSON or CSV, with progress")
    export.add_argument("--org", required=True, help="organization name or id")
    export.add_argument("--environment", default="prod", choices=ENVIRONMENTS, help="which customers (default prod)")
    export.add_argument("--format", default="ndjson", choices=("ndjson", "csv"), help="default ndjson")
    export.add_argument("--output", "-o", help="write here (default: standard output)")
    export.add_argument("--status", action="append", default=[], help="only this status (repeat for several)")
    export.add_argument("--usage-from", type=date.fromisoformat, help="usage window's first UTC day (YYYY-MM-DD)")
    export.add_argument("--usage-to", type=date.fromisoformat, help="usage window's last UTC day")
    export.add_argument("--usage-only", action="store_true", help="only customers with usage in the window")
    export.set_defaults(run=cmd_export)


async def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    async def work(conn: Connection) -> int:
        organization = (await auth.find_organization(conn, args.org)).id
        f = CustomerFilter(
            statuses=tuple(sorted(set(args.status))),
            usage_from=args.usage_from,
            usage_to=args.usage_to,
            usage_only=args.usage_only,
        )
        q = ListQuery(organization, args.environment, f, limit=PAGE, count=False)
        # Without usage_only every customer of the statuses is exported: the counters say how many.
        sql, values = count_sql(replace(q, filter=replace(f, usage_from=None, usage_to=None, usage_only=False)))
        total = None if f.usage_only else await conn.fetchval(sql, *values)
        shape = canonical_shape(False, False)
        columns = csv_columns(shape.fields)
        with ExitStack() as stack:
            out = stack.enter_context(Path(args.output).open("wb")) if args.output else sys.stdout.buffer
            started = shown = time.monotonic()
            done, after = 0, None
            out.write(header(args.format, columns))
            while True:
                page = await core.export_page(conn, q, shape, after)
                out.write(encode(args.format, page, columns))
                done += len(page)
                last = len(page) < PAGE
                now = time.monotonic()
                if last or now - shown >= PROGRESS_EVERY:
                    shown, rate = now, done / max(now - started, 1e-9)
                    of = f"/{total:,}" if total is not None else ""
                    end = "\n" if last else ""
                    print(f"\rexported {done:,}{of} customers ({rate:,.0f}/s)", end=end, file=sys.stderr, flush=True)
                if last:
                    return 0
                after = page[-1][1]
        return 0

    return await with_connection(settings, work)
