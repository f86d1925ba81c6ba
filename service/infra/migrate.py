"""Apply the plain SQL files in ``migrations/`` once each, in order.

Each file runs in its own transaction together with the row that records it, so a file is
either applied and recorded or neither. A checksum is recorded with it: a file edited after
it was applied is refused, because the database would no longer match the file. A session
advisory lock makes concurrent migrators (two replicas starting at once) take turns.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger("tally.migrate")

# An arbitrary constant shared by every tally migrator: pg_advisory_lock takes a bigint.
MIGRATION_LOCK_KEY = 7_245_112_901

CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text        PRIMARY KEY,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
SELECT_APPLIED = "SELECT version, checksum FROM schema_migrations"
RECORD_APPLIED = "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)"


class MigrationError(Exception):
    """The migrations on disk and the database disagree; nothing further was applied."""


class NotMigrated(MigrationError):
    """The database has no tally schema yet: run ``tally migrate``."""


@dataclass(frozen=True)
class Migration:
    version: str
    path: Path
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path) -> list[Migration]:
    """The ``NNNN_name.sql`` files of ``directory``, in version order."""
    if not directory.is_dir():
        raise MigrationError(f"migrations directory not found: {directory}")
    files = sorted(directory.glob("*.sql"))
    return [Migration(version=p.stem, path=p, sql=p.read_text(encoding="utf-8")) for p in files]


async def pending(conn: asyncpg.Connection, directory: Path) -> list[str]:
    """The migrations on disk that the database has not applied yet (all of them on a
    database without tally's ledger)."""
    migrations = load_migrations(directory)
    if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        return [m.version for m in migrations]
    applied = {r["version"] for r in await conn.fetch(SELECT_APPLIED)}
    return [m.version for m in migrations if m.version not in applied]


async def ensure_database(dsn: str) -> bool:
    """Create the database named in ``dsn`` if it does not exist. True if it was created."""
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        quoted = await admin.fetchval("SELECT quote_ident($1)", name)
        await admin.execute(f"CREATE DATABASE {quoted}")
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Another migrator created it first (a simultaneous CREATE DATABASE reports the
        # catalog's unique index rather than DuplicateDatabase).
        return False
    finally:
        await admin.close()
    return True


async def migrate(dsn: str, directory: Path, report: Callable[[str], None] = lambda _line: None) -> list[str]:
    """Bring the database at ``dsn`` up to date. Returns the versions applied by this call."""
    migrations = load_migrations(directory)
    if await ensure_database(dsn):
        report(f"created database {urlsplit(dsn).path.lstrip('/')}")
    conn = await asyncpg.connect(dsn)
    applied_now: list[str] = []
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            await conn.execute(CREATE_LEDGER)
            applied = {r["version"]: r["checksum"] for r in await conn.fetch(SELECT_APPLIED)}
            unknown = sorted(set(applied) - {m.version for m in migrations})
            if unknown:
                raise MigrationError(
                    f"database has migrations not on disk: {', '.join(unknown)} "
                    "(is this checkout older than the database?)"
                )
            for m in migrations:
                if m.version in applied:
                    if applied[m.version] != m.checksum:
                        raise MigrationError(
                            f"{m.path.name} was edited after it was applied "
                            f"(recorded checksum {applied[m.version][:12]}…, file {m.checksum[:12]}…); "
                            "add a new migration instead of changing an applied one"
                        )
                    continue
                report(f"applying {m.path.name}")
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(RECORD_APPLIED, m.version, m.checksum)
                applied_now.append(m.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()
    report(f"{len(applied_now)} applied, {len(migrations) - len(applied_now)} already up to date")
    return applied_now
