"""Earlier versions of tally beside this one, for before/after figures measured in one run:
each a detached git worktree of its commit, with a database of its own — made by that
version's migrations and filled with a copy of the benchmark's rows (the same customers and
usage, whatever the schema: columns are copied by name, and a version that kept usage in
``customers`` gets it from the ``customer_rows`` view).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from bench.common import ROOT, with_database

# Written by a version's own migrations; never copied.
OWN_TABLES = frozenset({"schema_migrations"})


def checkout(ref: str) -> Path:
    """A detached worktree of ``ref`` (removed by :func:`remove`), or this tree for ``HEAD``-as-is."""
    if ref == "working":
        return ROOT
    path = Path(tempfile.mkdtemp(prefix=f"tally-{ref}-"))
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), ref],
        check=True,
        capture_output=True,
    )
    return path


def remove(tree: Path) -> None:
    if tree != ROOT:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False, capture_output=True
        )


def tally(tree: Path, dsn: str, *args: str) -> str:
    """``tally ARGS`` run from ``tree`` against ``dsn``; its standard output."""
    env = {"TALLY_DATABASE_URL": dsn, "PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=tree, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"tally {' '.join(args)} in {tree}: {done.stderr[-2000:]}")
    return done.stdout


async def _columns(conn: asyncpg.Connection, relation: str) -> dict[str, bool]:
    """Column name → whether a COPY may write it (not generated, not an identity ALWAYS)."""
    rows = await conn.fetch(
        "SELECT column_name, is_generated = 'ALWAYS' OR identity_generation = 'ALWAYS' AS fixed"
        " FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
        relation,
    )
    return {r["column_name"]: not r["fixed"] for r in rows}


async def copy_rows(source_dsn: str, target_dsn: str) -> dict[str, int]:
    """Copy every table the target's migrations left empty from the source, by column name,
    with the target's triggers off (the rows are copied whole: counters included)."""
    src, dst = await asyncpg.connect(source_dsn), await asyncpg.connect(target_dsn)
    copied: dict[str, int] = {}
    try:
        await dst.execute("SET session_replication_role = replica")
        tables = [
            r["table_name"]
            for r in await dst.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
                " AND table_type = 'BASE TABLE' ORDER BY table_name"
            )
        ]
        for table in tables:
            if table in OWN_TABLES or await dst.fetchval(f'SELECT EXISTS (SELECT FROM "{table}")'):
                continue
            target = await _columns(dst, table)
            relation = "customer_rows" if table == "customers" and "total_cost" in target else table
            source = await _columns(src, relation)
            names = [c for c, writable in target.items() if writable and c in source]
            if not source or not names:
                continue
            copied[table] = await _copy(src, dst, relation, table, names)
        await dst.execute("SET session_replication_role = origin")
        await dst.execute("VACUUM ANALYZE")
    finally:
        await src.close()
        await dst.close()
    return copied


async def _copy(src: asyncpg.Connection, dst: asyncpg.Connection, relation: str, table: str, names: list[str]) -> int:
    columns = ", ".join(f'"{n}"' for n in names)
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=64)

    async def out(chunk: bytes) -> None:
        await chunks.put(chunk)

    async def source() -> AsyncIterator[bytes]:
        while (chunk := await chunks.get()) is not None:
            yield chunk

    async def produce() -> None:
        try:
            await src.copy_from_query(f'SELECT {columns} FROM "{relation}"', output=out, format="csv")
        finally:
            await chunks.put(None)

    producer = asyncio.create_task(produce())
    status = await dst.copy_to_table(table, source=source(), columns=names, format="csv")
    await producer
    return int(status.split()[-1])


async def prepare(ref: str, dataset: str, base_dsn: str) -> tuple[Path, str]:
    """A checkout of ``ref`` (``working``: this tree) and a database of its own holding the
    rows of the database ``dataset``, made the same way for every version: migrated by the
    version, filled by one copy, vacuumed and analyzed (reused while it holds as many
    customers and all of the version's migrations)."""
    tree = checkout(ref)
    sha = (
        "this"
        if tree == ROOT
        else subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    name = f"{dataset}_{sha}"
    migrations = len(list((tree / "migrations").glob("*.sql")))
    dsn, dataset_dsn = with_database(base_dsn, name), with_database(base_dsn, dataset)
    src = await asyncpg.connect(dataset_dsn)
    try:
        wanted = await src.fetchval("SELECT count(*) FROM customers")
    finally:
        await src.close()
    admin = await asyncpg.connect(with_database(base_dsn, "postgres"))
    try:
        exists = await admin.fetchval("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)", name)
    finally:
        await admin.close()
    if exists:
        conn = await asyncpg.connect(dsn)
        try:
            same = await conn.fetchval("SELECT count(*) FROM customers") == wanted and (
                await conn.fetchval("SELECT count(*) FROM schema_migrations") == migrations
            )
            if same:
                print(f"reusing {name} for {ref}", file=sys.stderr)
                return tree, dsn
        finally:
            await conn.close()
        admin = await asyncpg.connect(with_database(base_dsn, "postgres"))
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    tally(tree, dsn, "migrate")
    copied = await copy_rows(dataset_dsn, dsn)
    print(f"{ref} ({sha}): {name} with {copied}", file=sys.stderr)
    return tree, dsn
