"""Every SQL statement tally's own code runs, captured during the test session, and the check
that each would route by organization on Citus (docs/citus.md).

Capture: asyncpg's ``Connection._execute`` / ``_executemany`` / ``execute`` are wrapped for
the whole session (tests/conftest.py installs it). A statement counts as tally's when a frame
of ``service/`` or ``consumers/`` is on the stack that ran it (the tests' own helpers and
factories are not tally). The first successful run of each distinct statement text is kept
with its arguments and database.

Check: each kept statement that names a distributed table is explained (``EXPLAIN (VERBOSE,
FORMAT JSON)`` with the arguments it ran with) and its plan walked. A scan of a distributed
table must carry a condition on ``organization_id`` — its own (index condition, filter) or
that of a join above it (a co-located join on the distribution column); an INSERT always
supplies ``organization_id`` (NOT NULL). A statement is *single-shard* when some condition
compares ``organization_id`` to one parameter or constant, and *per-row* when the
organization comes from another row source (an ``unnest`` of a batch's keys): Citus routes
such a statement to every shard the rows name, not to one. No frame-free helpers, no server
configuration: it works on a fresh machine.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import asyncpg.connection

ROOT = Path(__file__).resolve().parent.parent
TALLY_DIRS = (str(ROOT / "service") + "/", str(ROOT / "consumers") + "/")

# The distribution plan (docs/citus.md): distributed by organization_id, all co-located.
DISTRIBUTED = frozenset(
    {
        "customers",
        "customer_usage",
        "daily_usage",
        "daily_model_usage",
        "subscriptions",
        "processed_events",
        "budget_alerts",
        "budget_recoveries",
        "usage_window_marks",
        "customer_counts",
        "customer_tombstones",
        "customer_changes",
        "customer_changes_purged",
        "webhook_endpoints",
        "webhook_deliveries",
    }
)
# Replicated to every node: small, read on every request or event before the organization
# is known (a key is looked up by its prefix, an event's organization by its name).
REFERENCE = frozenset({"organizations", "api_keys", "instance_secrets"})
# On the coordinator only: the migrator's bookkeeping, the API replicas' heartbeats, how far
# housekeeping has looked for budget recoveries.
LOCAL = frozenset({"schema_migrations", "api_replicas", "budget_recovery_mark"})

_TABLE_WORD = re.compile(r"\b(" + "|".join(sorted(DISTRIBUTED | {"customer_rows"})) + r")\b")
_ORG_EQ_VALUE = re.compile(r"organization_id\)? = (\$\d+|'[0-9a-f-]{36}'::uuid|\(\$\d+\)::uuid)")
# Data statements only (the migrator's DDL is not routed by Citus the same way).
_DML = re.compile(r"^\s*(?:--[^\n]*\n\s*)*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", re.IGNORECASE)
_CONDITIONS = ("Index Cond", "Recheck Cond", "Filter", "TID Cond")
_JOIN_CONDITIONS = ("Hash Cond", "Merge Cond", "Join Filter")


@dataclass
class Captured:
    query: str
    args: tuple[Any, ...]
    database: str
    caller: str  # the innermost tally frame: path:function


@dataclass
class Capture:
    statements: dict[str, Captured] = field(default_factory=dict)

    def record(self, conn: asyncpg.Connection, query: str, args: tuple[Any, ...]) -> None:
        if query in self.statements or not _TABLE_WORD.search(query) or not _DML.match(query):
            return
        caller = _tally_caller()
        # The migrator runs whole migration files (DDL, and data fixes inside them) once per
        # database, on the coordinator: not statements Citus routes.
        if caller is None or caller.startswith("service/infra/migrate.py"):
            return
        database = conn._params.database  # type: ignore[attr-defined]
        self.statements[query] = Captured(query, tuple(args), database, caller)


CAPTURE = Capture()


def _tally_caller() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(TALLY_DIRS):
            return f"{Path(filename).relative_to(ROOT)}:{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


def install() -> None:
    """Wrap asyncpg's statement entry points (idempotent)."""
    cls = asyncpg.connection.Connection
    if getattr(cls, "_tally_capture", False):
        return
    execute, run, run_many = cls.execute, cls._execute, cls._executemany

    async def _execute(self, query, args, *rest, **kwargs):  # type: ignore[no-untyped-def]
        result = await run(self, query, args, *rest, **kwargs)
        CAPTURE.record(self, query, tuple(args))
        return result

    async def _executemany(self, query, args, *rest, **kwargs):  # type: ignore[no-untyped-def]
        rows = list(args)
        result = await run_many(self, query, rows, *rest, **kwargs)
        if rows:
            CAPTURE.record(self, query, tuple(rows[0]))
        return result

    async def execute_(self, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = await execute(self, query, *args, **kwargs)
        if not args:  # with arguments it went through _execute, recorded there
            CAPTURE.record(self, query, ())
        return result

    cls._execute, cls._executemany, cls.execute = _execute, _executemany, execute_
    cls._tally_capture = True


@dataclass
class Verdict:
    statement: Captured
    routing: str  # "single-shard", "per-row", "unconstrained", or "unexplained: ..."
    unconstrained: list[str] = field(default_factory=list)  # distributed tables scanned without a condition


async def judge(conn: asyncpg.Connection, statement: Captured) -> Verdict:
    """Explain ``statement`` with its own arguments (never executed: no ANALYZE) and classify it."""
    query = statement.query.strip().rstrip(";")
    try:
        plan = await conn.fetchval(f"EXPLAIN (VERBOSE, FORMAT JSON) {query}", *statement.args)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return Verdict(statement, f"unexplained: {type(exc).__name__}: {exc}")
    if isinstance(plan, str):
        import orjson

        plan = orjson.loads(plan)
    bare: list[str] = []
    texts: list[str] = []
    per_row = [False]
    single_insert = [False]
    scanned = [False]

    def walk(node: dict[str, Any], joins: list[str]) -> None:
        own = [str(node.get(k, "")) for k in _CONDITIONS]
        texts.extend(own)
        here = joins + [str(node.get(k, "")) for k in _JOIN_CONDITIONS]
        texts.extend(here[len(joins) :])
        relation = node.get("Relation Name")
        if relation in DISTRIBUTED:
            scanned[0] = True
            if node.get("Node Type") == "ModifyTable":
                if node.get("Operation") == "Insert":
                    if any(child.get("Node Type") != "Result" for child in node.get("Plans", [])):
                        per_row[0] = True  # INSERT … SELECT: each row carries its own organization
                    else:
                        single_insert[0] = True  # INSERT … VALUES: one row, one organization
            elif not any("organization_id" in t for t in own + here):
                bare.append(f"{relation} ({node.get('Node Type')})")
        for child in node.get("Plans", []):
            walk(child, here)

    walk(plan[0]["Plan"], [])
    if not scanned[0]:
        # The planner proved the statement reads no distributed table (say, a filter that
        # matches nothing folded to a constant false): there is no shard to route to.
        return Verdict(statement, "single-shard")
    if bare:
        return Verdict(statement, "unconstrained", bare)
    single = single_insert[0] or any(_ORG_EQ_VALUE.search(t) for t in texts)
    return Verdict(statement, "single-shard" if single and not per_row[0] else "per-row")
