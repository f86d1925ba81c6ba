"""The vocabulary is defined once (service/domain/vocabulary.py, and the key scopes in
service/domain/keys.py): every set of values the migrated schema enforces with a CHECK
constraint is one of them, spelled the same. A value added on one side only fails here."""

from __future__ import annotations

import re

import asyncpg

from service.domain.keys import SCOPES
from service.domain.vocabulary import BUDGET_DURATIONS, ENVIRONMENTS, STATUSES
from service.domain.webhooks import DELIVERY_STATES, EVENT_TYPES
from service.store.alerts import SHARES

# Column → the code's definition of the values it may hold.
VOCABULARY = {
    "environment": ENVIRONMENTS,
    "status": STATUSES,
    "budget_duration": BUDGET_DURATIONS,
    "scopes": SCOPES,
    "threshold": tuple(SHARES),
    "state": DELIVERY_STATES,  # a webhook delivery's
    "events": EVENT_TYPES,  # those a webhook endpoint takes
}
# `col = ANY (ARRAY['a'::text, ...])` and `col <@ ARRAY['a'::text, ...]`, as PostgreSQL prints them.
ENUMERATED = re.compile(r"\(\((\w+) (?:= ANY \(|<@ )ARRAY\[([^\]]*)\]")

CHECKS = """
SELECT t.relname AS table_name, c.conname, pg_get_constraintdef(c.oid) AS definition
FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE c.contype = 'c' AND n.nspname = 'public'
"""


async def test_every_enumerated_check_is_the_vocabulary(pool: asyncpg.Pool) -> None:
    enumerated = []
    for row in await pool.fetch(CHECKS):
        match = ENUMERATED.search(row["definition"])
        if match is None:
            continue
        column, values = match[1], re.findall(r"'([^']*)'::text", match[2])
        enumerated.append(row["conname"])
        assert column in VOCABULARY, f"{row['conname']} enumerates {column} in SQL only: {values}"
        assert sorted(values) == sorted(VOCABULARY[column]), row["conname"]
    # The sets the schema enumerates today, found by the pattern (so that it cannot match none).
    assert {
        "customers_status_check",
        "customers_environment_check",
        "customers_budget_duration_check",
        "api_keys_environment_check",
        "api_keys_scopes_check",
        "budget_alerts_threshold_check",
        "webhook_deliveries_state_check",
        "webhook_endpoints_events_check",
    } <= set(enumerated)
