"""The migrator against a real, empty database."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import asyncpg
import pytest

from service.infra.migrate import MigrationError, migrate
from service.infra.settings import DEFAULT_MIGRATIONS_DIR
from tests.support import BASE_DSN, with_database

# The migrator makes databases of its own (no fixture says so).
pytestmark = pytest.mark.services


@pytest.fixture
async def empty_dsn():
    name = f"tally_migrate_{uuid.uuid4().hex[:10]}"
    yield with_database(BASE_DSN, name)
    admin = await asyncpg.connect(with_database(BASE_DSN, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_creates_database_and_applies_every_file_once(empty_dsn: str) -> None:
    lines: list[str] = []
    first = await migrate(empty_dsn, DEFAULT_MIGRATIONS_DIR, report=lines.append)
    assert first == [p.stem for p in sorted(DEFAULT_MIGRATIONS_DIR.glob("*.sql"))]
    assert lines[0].startswith("created database")
    assert await migrate(empty_dsn, DEFAULT_MIGRATIONS_DIR) == []
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(first)
        assert await conn.fetchval("SELECT to_regclass('customers') IS NOT NULL")
    finally:
        await conn.close()


async def test_concurrent_migrators_apply_once(empty_dsn: str) -> None:
    results = await asyncio.gather(*(migrate(empty_dsn, DEFAULT_MIGRATIONS_DIR) for _ in range(3)))
    applied = [v for r in results for v in r]
    assert sorted(applied) == sorted(p.stem for p in DEFAULT_MIGRATIONS_DIR.glob("*.sql"))


async def test_edited_applied_migration_is_refused(empty_dsn: str, tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, directory)
    await migrate(empty_dsn, directory)
    first = sorted(directory.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="edited after it was applied"):
        await migrate(empty_dsn, directory)


async def test_failed_migration_leaves_nothing_recorded(empty_dsn: str, tmp_path: Path) -> None:
    directory = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, directory)
    (directory / "9999_broken.sql").write_text("CREATE TABLE half_done (id int); SELECT no_such_function();")
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await migrate(empty_dsn, directory)
    conn = await asyncpg.connect(empty_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations WHERE version = '9999_broken'") == 0
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
    finally:
        await conn.close()
