"""Periodic jobs the consumers run beside ingestion (consumers/housekeeping.py): forgetting
dedupe keys past the retention window, and the change log past its own, folding the
customer-count deltas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service.store.db import Connection

PURGE_PROCESSED = """
DELETE FROM processed_events
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM processed_events WHERE organization_id = $1 AND event_time < $2 LIMIT $3))
"""
PURGE_TOMBSTONES = "DELETE FROM customer_tombstones WHERE deleted_at < $1"


async def purge_processed(conn: Connection, retention: timedelta, *, chunk: int = 10_000) -> int:
    """Forget dedupe keys (and their journal) and tombstones of events older than
    ``retention`` plus a day. The fold refuses events older than ``retention``, so a purged
    key can never be applied again and a purged tombstone can never matter again; the day
    covers clock skew between consumers and the database. Deletes in chunks, per
    organization (the index is ``(organization_id, event_time)``), to keep locks short."""
    cutoff = datetime.now(UTC) - retention - timedelta(days=1)
    total = 0
    for org in await conn.fetch("SELECT id FROM organizations"):
        while True:
            status = await conn.execute(PURGE_PROCESSED, org["id"], cutoff, chunk)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < chunk:
                break
    await conn.execute(PURGE_TOMBSTONES, cutoff)
    return total


# Folding the counters' delta rows into one row per key. Concurrent writers only insert
# new deltas, which this statement's snapshot does not see, so nothing is lost; two
# compactions at once are safe too (the second skips rows the first deleted).
COMPACT_COUNTS = """
WITH gone AS (DELETE FROM customer_counts RETURNING organization_id, environment, status, delta)
INSERT INTO customer_counts
SELECT organization_id, environment, status, sum(delta) FROM gone GROUP BY 1, 2, 3 HAVING sum(delta) <> 0
"""


async def compact_counts(conn: Connection) -> None:
    """Fold the customer-count deltas (run periodically by consumers)."""
    await conn.execute(COMPACT_COUNTS)


# Each chunk records, per organization and environment, the newest position it purged
# (migration 0011): a change feed cursor below it is told to resync (service/store/changefeed.py).
PURGE_CHANGES = """
WITH gone AS (
    DELETE FROM customer_changes WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM customer_changes WHERE changed_at < $1 LIMIT $2))
    RETURNING organization_id, environment, xid, seq
), newest AS (
    SELECT DISTINCT ON (organization_id, environment) organization_id, environment, xid, seq
    FROM gone ORDER BY organization_id, environment, xid DESC, seq DESC
), marked AS (
    INSERT INTO customer_changes_purged AS p (organization_id, environment, xid, seq)
    SELECT * FROM newest
    ON CONFLICT (organization_id, environment) DO UPDATE SET xid = excluded.xid, seq = excluded.seq
    WHERE (excluded.xid, excluded.seq) > (p.xid, p.seq)
)
SELECT count(*) FROM gone
"""


async def purge_changes(conn: Connection, retention: timedelta, *, chunk: int = 10_000) -> int:
    """Forget change-log rows older than ``retention``, in chunks; returns how many."""
    cutoff = datetime.now(UTC) - retention
    total = 0
    while True:
        deleted = int(await conn.fetchval(PURGE_CHANGES, cutoff, chunk))
        total += deleted
        if deleted < chunk:
            return total


# Tally's tables whose statistics have fallen behind their rows, by the rule autovacuum uses
# for analyzing (50 rows plus 10 % of the table changed since the last analyze).
STALE_TABLES = """
SELECT s.relname
FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
WHERE s.schemaname = current_schema()
  AND s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0)
ORDER BY s.relname
"""


async def analyze_stale(conn: Connection) -> list[str]:
    """ANALYZE each table whose statistics are stale (see STALE_TABLES); returns their names.

    Plans do not depend on statistics for their shape (every join between a customer's tables
    is by primary key, and a customer found by its key is probed: service/store/apply.py
    by_key_order), but filters' row estimates do; a server whose autovacuum is off, or has not
    caught up minutes after a bulk load, would plan with what it knew before."""
    tables: list[str] = [r["relname"] for r in await conn.fetch(STALE_TABLES)]
    for table in tables:
        # A name from the catalogue, quoted as an identifier: never text from a request.
        await conn.execute(f'ANALYZE "{table}"')
    return tables


# Tally's tables holding more dead rows than autovacuum's rule would let stand (50 rows plus
# 20 % of the table) where autovacuum will not clean them: it is off on the server, or for the
# table. Deleted rows that no vacuum reclaims stay in every scan of their pages: the webhook
# dispatcher's claims (deliveries deleted once made) slowed from about 650 to about 90 a second
# on such a server, and the change-log purge leaves the same behind.
DEAD_TABLES = """
SELECT s.relname
FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
WHERE s.schemaname = current_schema()
  AND s.n_dead_tup > 50 + 0.2 * greatest(c.reltuples, 0)
  AND (current_setting('autovacuum') = 'off' OR coalesce(c.reloptions, '{}') @> ARRAY['autovacuum_enabled=false'])
ORDER BY s.relname
"""


async def vacuum_dead(conn: Connection) -> list[str]:
    """VACUUM each table whose dead rows autovacuum will not reclaim (see DEAD_TABLES); returns
    their names. SKIP_LOCKED: a table another process is vacuuming is left to it. Outside any
    transaction (VACUUM cannot run in one)."""
    tables: list[str] = [r["relname"] for r in await conn.fetch(DEAD_TABLES)]
    for table in tables:
        # A name from the catalogue, quoted as an identifier: never text from a request.
        await conn.execute(f'VACUUM (SKIP_LOCKED) "{table}"')
    return tables
