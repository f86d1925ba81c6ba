"""The change log (migration 0010): which customers each committed transaction changed.

Every write path (the fold's batches, API writes) goes through
:func:`service.store.apply.apply_changes`, which calls :func:`log_changes` in the write's own
transaction: the log holds a change exactly when the change committed.

Positions. A :class:`Position` ``(xid, seq)`` says "every logged change up to here is
reflected". Transaction ids are assigned when a transaction first writes, not when it
commits, so a reader takes only rows below its snapshot's ``xmin`` — the oldest transaction
still running: every transaction below it has ended, and no row can appear there later. The
``xmin`` is also what a read reports as ``as_of``: a page read in that snapshot reflects every
change below it (and possibly some after it), so a client that lists, then follows the log
from ``as_of``, misses nothing (it may see a change twice).

Notifications. The same statement NOTIFYs :data:`CHANNEL` with ``organization:environment``
once per pair; PostgreSQL delivers it when (and only if) the transaction commits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from uuid import UUID

from service.store.db import Connection, columns

CHANNEL = "tally_changes"

Kind = Literal["c", "u", "d"]  # created, updated, deleted


@dataclass(frozen=True, order=True)
class Position:
    """A point in the log: every change at or before ``(xid, seq)`` is reflected."""

    xid: int
    seq: int = 0

    _FORM = re.compile(r"^(\d{1,19})\.(\d{1,19})$")

    def __str__(self) -> str:
        return f"{self.xid}.{self.seq}"

    @classmethod
    def parse(cls, text: str) -> Position:
        """``xid.seq`` as :meth:`__str__` writes it; ValueError otherwise."""
        match = cls._FORM.match(text)
        if match is None:
            raise ValueError("a position is two decimal numbers, xid.seq, as tally gave it")
        xid, seq = int(match[1]), int(match[2])
        if xid >= 2**63 or seq >= 2**63:
            raise ValueError("a position's numbers are below 2^63")
        return cls(xid, seq)


def notice(organization_id: UUID, environment: str) -> str:
    """The payload of a notification on :data:`CHANNEL`."""
    return f"{organization_id}:{environment}"


def parse_notice(payload: str) -> tuple[UUID, str] | None:
    """``(organization_id, environment)`` of a notification's payload, None if malformed."""
    organization, _, environment = payload.partition(":")
    try:
        return UUID(organization), environment
    except ValueError:
        return None


# One row per (organization, environment) of the changes given in order, then one
# notification per row. changed_at is the clock when the row is written — a write's last step
# but its alerts before the commit — not the transaction's start (the column's default): a
# fold's transaction takes a while, and readers measure delivery from the commit.
LOG_CHANGES = f"""
WITH logged AS (
    INSERT INTO customer_changes (organization_id, environment, customer_ids, customer_identifiers, kinds, changed_at)
    SELECT u.organization_id, u.environment, array_agg(u.id ORDER BY u.n), array_agg(u.identifier ORDER BY u.n),
           string_agg(u.kind, '' ORDER BY u.n), clock_timestamp()
    FROM unnest($1::uuid[], $2::text::text[], $3::uuid[], $4::text::text[], $5::text::text[])
         WITH ORDINALITY AS u(organization_id, environment, id, identifier, kind, n)
    GROUP BY u.organization_id, u.environment
    RETURNING organization_id, environment
)
SELECT pg_notify('{CHANNEL}', organization_id::text || ':' || environment) FROM logged
"""


async def log_changes(conn: Connection, changes: Sequence[tuple[UUID, str, UUID, str, Kind]]) -> None:
    """Log ``(organization_id, environment, customer_id, identifier, kind)`` changes in the
    caller's transaction."""
    if changes:
        await conn.execute(LOG_CHANGES, *columns(changes, LOG_CHANGES))


@dataclass(frozen=True)
class Logged:
    """One transaction's changes in one organization and environment."""

    position: Position
    customer_ids: list[UUID]
    customer_identifiers: list[str]
    kinds: str
    changed_at: datetime


# For each ask ($1..$5: organization, environment, position xid.seq, limit), the rows after
# its position below the snapshot's horizon, and the horizon, in one snapshot (a second
# statement's horizon could be past rows the first did not see); with, in the same snapshot,
# whether housekeeping purged rows after the position (so some are gone) and whether rows after
# it have committed at or above the horizon (held back until an older transaction ends). Those
# are the rows after the later of the position and (horizon, 0) — sequence numbers start at 1
# — so that index scan starts at the horizon, not at a position a lagging reader left far
# behind. One statement for many asks: the streams of a process that one commit wakes read
# together (service/api/changefeed.py).
READ_CHANGES = """
WITH h AS MATERIALIZED (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin),
asks AS MATERIALIZED (
    SELECT k.n, k.organization_id, k.environment, k.xid, k.seq, k.lim, h.xmin,
           EXISTS (
               SELECT 1 FROM customer_changes_purged p
               WHERE p.organization_id = k.organization_id AND p.environment = k.environment
                 AND (p.xid, p.seq) > (k.xid, k.seq)
           ) AS purged,
           EXISTS (
               SELECT 1 FROM customer_changes a
               WHERE a.organization_id = k.organization_id AND a.environment = k.environment
                 AND (a.xid, a.seq) > (CASE WHEN h.xmin > k.xid THEN h.xmin ELSE k.xid END,
                                       CASE WHEN h.xmin > k.xid THEN 0 ELSE k.seq END)
           ) AS held_back
    FROM unnest($1::uuid[], $2::text[], $3::text[]::xid8[], $4::int8[], $5::int4[])
         WITH ORDINALITY AS k(organization_id, environment, xid, seq, lim, n)
    CROSS JOIN h
)
SELECT k.n, k.xmin::text AS horizon, k.purged, k.held_back, c.xid::text AS xid, c.seq, c.customer_ids,
       c.customer_identifiers, c.kinds, c.changed_at
FROM asks k LEFT JOIN LATERAL (
    SELECT * FROM customer_changes c
    WHERE c.organization_id = k.organization_id AND c.environment = k.environment
      AND (c.xid, c.seq) > (k.xid, k.seq) AND c.xid < k.xmin
    ORDER BY c.xid, c.seq
    LIMIT k.lim
) c ON true
ORDER BY k.n, c.xid, c.seq
"""


@dataclass(frozen=True)
class LogRead:
    """What one read of the log found after a position."""

    rows: list[Logged]  # at most the limit, in log order
    reached: Position  # the last row's position, or (fewer than the limit) the horizon
    purged: bool  # rows after the position were purged (housekeeping): some are gone
    held_back: bool  # rows after the position committed at or above the horizon: not readable yet


LogAsk = tuple[UUID, str, Position, int]  # organization, environment, after, limit


async def read_logs(conn: Connection, asks: Sequence[LogAsk]) -> list[LogRead]:
    """For each ask, up to its limit of logged changes after its position, in log order, and
    the position the reader has reached: the last row's, or — when fewer than the limit were
    there — the horizon, past which nothing more can appear below it. One statement, one
    snapshot for all."""
    if not asks:
        return []
    found: list[list[Logged]] = [[] for _ in asks]
    marks: list[tuple[int, bool, bool]] = [(0, False, False)] * len(asks)
    arrays = columns(
        (organization_id, environment, str(after.xid), after.seq, limit)
        for organization_id, environment, after, limit in asks
    )
    for r in await conn.fetch(READ_CHANGES, *arrays):
        i = r["n"] - 1
        marks[i] = (int(r["horizon"]), r["purged"], r["held_back"])
        if r["xid"] is not None:
            found[i].append(
                Logged(
                    Position(int(r["xid"]), r["seq"]),
                    r["customer_ids"],
                    r["customer_identifiers"],
                    r["kinds"],
                    r["changed_at"],
                )
            )
    reads = []
    for (_, _, after, limit), logged, (horizon_xid, purged, held_back) in zip(asks, found, marks, strict=True):
        reached = logged[-1].position if len(logged) == limit else max(after, Position(horizon_xid))
        reads.append(LogRead(logged, reached, purged, held_back))
    return reads


async def read_log(conn: Connection, organization_id: UUID, environment: str, after: Position, limit: int) -> LogRead:
    """:func:`read_logs` for one organization and environment."""
    return (await read_logs(conn, [(organization_id, environment, after, limit)]))[0]


async def read_changes(
    conn: Connection, organization_id: UUID, environment: str, after: Position, limit: int
) -> tuple[list[Logged], Position]:
    """:func:`read_log`'s rows and reach."""
    read = await read_log(conn, organization_id, environment, after, limit)
    return read.rows, read.reached


# The horizon of a statement's own snapshot, to select beside what it reads: see the module's
# docstring.
HORIZON = "pg_snapshot_xmin(pg_current_snapshot())::text"


async def horizon(conn: Connection) -> Position:
    """The position every read on ``conn`` from now on reflects at least."""
    return Position(int(await conn.fetchval(f"SELECT {HORIZON}")))
