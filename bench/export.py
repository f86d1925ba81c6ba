"""Export benchmark: every customer of a large organization streamed by
``GET /v1/customers/export`` (NDJSON and CSV) and by ``tally export`` (CSV to a file): rows/s,
time to the first byte, and peak memory — the API's growth over its idle size while it streams,
and the CLI's whole peak — against the same rows paged through the canonical list by cursor in
the same run (the baseline: what a client paging by hand gets).

    python bench/export.py [--customers 600000] [--json …]

The organization is loaded straight into a fresh database by SQL (generated profiles and
usage aggregates), dropped afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    UNLIMITED,
    Process,
    free_port,
    machine,
    print_table,
    start_tally,
    wait_ready,
    with_database,
    write_json,
)
from bench.ingest import drop_database  # noqa: E402
from service.infra.migrate import migrate  # noqa: E402
from service.store import auth  # noqa: E402

ORG = "bench-export"
LOAD = """
INSERT INTO customers (organization_id, environment, customer_identifier, name, email, metadata)
SELECT $1, 'prod', 'user_' || g, 'Customer ' || g, 'user' || g || '@example.com', jsonb_build_object('plan', g % 7)
FROM generate_series(1, $2) g
"""
USAGE = """
UPDATE customer_usage SET number_of_requests = (random() * 5000)::int, prompt_tokens = (random() * 1e6)::int,
    completion_tokens = (random() * 5e5)::int, total_tokens = (random() * 1.5e6)::int,
    total_cost = round((random() * 300)::numeric, 4), first_seen = now() - interval '30 days', last_active = now()
WHERE organization_id = $1
"""


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], rss_mb(pid))
        except OSError:
            return
        await asyncio.sleep(0.05)


async def stream(session: aiohttp.ClientSession, url: str, api: Process, header_lines: int = 0) -> dict[str, object]:
    """One export over HTTP: rows (lines, less the header's), rows/s, first byte, the API's RSS growth."""
    idle = rss_mb(api.popen.pid)
    peak, stop = [idle], asyncio.Event()
    sampler = asyncio.create_task(sample_rss(api.popen.pid, peak, stop))
    started = time.perf_counter()
    first = None
    lines = 0
    async with session.get(url) as r:
        assert r.status == 200, await r.text()
        async for chunk in r.content.iter_chunked(1 << 16):
            if first is None:
                first = time.perf_counter() - started
            lines += chunk.count(b"\n")
    elapsed = time.perf_counter() - started
    stop.set()
    await sampler
    lines -= header_lines
    return {
        "rows": lines,
        "rows_per_second": round(lines / elapsed, 1),
        "seconds": round(elapsed, 2),
        "first_byte_ms": round((first or 0) * 1000, 1),
        "api_rss_idle_mb": round(idle, 1),
        "api_rss_peak_mb": round(peak[0], 1),
    }


async def paged(session: aiohttp.ClientSession, base: str) -> dict[str, object]:
    """The baseline: the canonical list, 1,000 per page by cursor (each page with its count)."""
    started, rows, cursor = time.perf_counter(), 0, None
    while True:
        params = {"limit": "1000", "sort_by": "customer_identifier"}
        if cursor:
            params["cursor"] = cursor
        async with session.get(f"{base}/v1/customers", params=params) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        rows += len(body["results"])
        cursor = body.get("next_cursor")
        if not cursor:
            break
    elapsed = time.perf_counter() - started
    return {"rows": rows, "rows_per_second": round(rows / elapsed, 1), "seconds": round(elapsed, 2)}


async def cli_export(dsn: str, out: Path) -> dict[str, object]:
    """``tally export --format csv`` to a file: rows/s and the process's peak RSS."""
    env = {**os.environ, "TALLY_DATABASE_URL": dsn, "TALLY_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    popen = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "export", "--org", ORG, "--format", "csv", "--output", str(out)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak, stop = [0.0], asyncio.Event()
    sampler = asyncio.create_task(sample_rss(popen.pid, peak, stop))
    while popen.poll() is None:
        await asyncio.sleep(0.05)
    stop.set()
    await sampler
    elapsed = time.perf_counter() - started
    rows = sum(1 for _ in out.open("rb")) - 1  # the header
    return {
        "rows": rows,
        "rows_per_second": round(rows / elapsed, 1),
        "seconds": round(elapsed, 2),
        "peak_rss_mb": round(peak[0], 1),
        "exit": popen.returncode,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=600_000)
    parser.add_argument("--dsn", default=os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args()

    dsn = with_database(args.dsn, f"tally_bench_export_{secrets.token_hex(3)}")
    await migrate(dsn, ROOT / "migrations")
    workdir = Path(tempfile.mkdtemp(prefix="tally-bench-export-"))
    api = None
    try:
        conn = await asyncpg.connect(dsn)
        org_id = await auth.create_organization(conn, ORG)
        key = (await auth.create_key(conn, ORG, ("read",))).key
        print(f"loading {args.customers:,} customers", file=sys.stderr)
        await conn.execute(LOAD, org_id, args.customers)
        await conn.execute(USAGE, org_id)
        await conn.execute("VACUUM ANALYZE customers")
        await conn.execute("VACUUM ANALYZE customer_usage")
        await conn.close()
        port = free_port()
        env = {"TALLY_DATABASE_URL": dsn, "TALLY_HTTP_PORT": str(port), "TALLY_HTTP_HOST": "127.0.0.1", **UNLIMITED}
        api = start_tally("api", env, workdir / "api.log", port)
        base = f"http://127.0.0.1:{port}"
        await wait_ready(f"{base}/healthz", api)
        results: dict[str, object] = {}
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=None)
        ) as session:
            results["list_by_cursor"] = await paged(session, base)
            print(f"list by cursor: {results['list_by_cursor']}", file=sys.stderr)
            for fmt in ("ndjson", "csv"):
                url = f"{base}/v1/customers/export?format={fmt}"
                results[f"export_{fmt}"] = await stream(session, url, api, header_lines=int(fmt == "csv"))
                print(f"export {fmt}: {results[f'export_{fmt}']}", file=sys.stderr)
        results["cli_csv"] = await cli_export(dsn, workdir / "customers.csv")
    finally:
        if api is not None:
            api.stop()
        await drop_database(args, dsn)
    baseline = results["list_by_cursor"]["rows_per_second"]  # type: ignore[index]
    rows = []
    for name, label in (
        ("list_by_cursor", "canonical list, 1,000 per page by cursor (baseline)"),
        ("export_ndjson", "GET /v1/customers/export?format=ndjson"),
        ("export_csv", "GET /v1/customers/export?format=csv"),
        ("cli_csv", "tally export --format csv -o FILE"),
    ):
        r = results[name]
        assert isinstance(r, dict)
        memory = (
            f"API {r['api_rss_idle_mb']} → {r['api_rss_peak_mb']} MB"
            if "api_rss_peak_mb" in r
            else (f"CLI peak {r['peak_rss_mb']} MB" if "peak_rss_mb" in r else "")
        )
        rows.append([label, r["rows"], r["rows_per_second"], round(r["rows_per_second"] / baseline, 2), memory])
    print_table(
        f"Export: {args.customers:,} customers of one organization",
        ["how", "rows", "rows/s", "× baseline", "memory"],
        rows,
    )
    write_json(
        args.json, {"benchmark": "export", "customers": args.customers, "machine": machine(), "results": results}
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
