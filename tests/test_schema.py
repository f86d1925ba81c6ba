"""service/store/schema.sql is the schema as the migrations leave it: regenerated from a
database migrated from scratch, it must be what is checked in (run `make schema` after adding a
migration). It needs pg_dump, PostgreSQL's client tool: it skips, saying so, where pg_dump is
absent, and CI (.ci/run) sets TALLY_REQUIRE_PG_DUMP so that there it never skips."""

from __future__ import annotations

import os
import shutil

import pytest

from service.infra.schemadump import SCHEMA_FILE, fresh
from tests.support import BASE_DSN

PG_DUMP = shutil.which("pg_dump")

pytestmark = [
    pytest.mark.services,  # makes and migrates a database of its own
    pytest.mark.skipif(
        PG_DUMP is None and not os.environ.get("TALLY_REQUIRE_PG_DUMP"),
        reason="needs pg_dump (PostgreSQL's client tools; .ci/run requires it)",
    ),
]


async def test_the_checked_in_schema_is_the_migrations_schema() -> None:
    assert PG_DUMP is not None, "TALLY_REQUIRE_PG_DUMP is set but pg_dump is not installed"
    assert await fresh(BASE_DSN) == SCHEMA_FILE.read_text(), "service/store/schema.sql is stale: run `make schema`"
