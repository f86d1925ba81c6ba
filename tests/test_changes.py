"""The pure fold (service/domain/changes.py ``plan``), driven by Hypothesis against the same
reference model as the database property test (tests/orderkit.py), with no database: every
history, in any order, folds into what the rules define — the live customers' sums, days,
first and last use, each field's newest write (a usage hint below any upsert), each
subscription's newest event, the tombstones a batch raises and which changes are stale.
Thousands of histories run in seconds; tests/test_order_independence.py proves the same
rules hold once the store writes the plans, across batches, consumers and redeliveries."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.domain.changes import Change, Delta, Key, Usage, plan, window_costs
from service.domain.events import validate_event
from service.domain.vocabulary import WRITABLE_COLUMNS
from tests.orderkit import NOW, State, event, model

ORG = uuid.UUID(int=7)


@st.composite
def histories(draw: st.DrawFn) -> list[dict[str, Any]]:
    return [draw(event(i)) for i in range(draw(st.integers(1, 40)))]


def changes_of(history: list[dict[str, Any]]) -> list[Change]:
    return [Change.of(ORG, validate_event({**raw, "organization": str(ORG)}, NOW)) for raw in history]


def normalized(value: object) -> object:
    """A field's value as the model writes it (JSON) — the domain types it (Decimal)."""
    return str(value) if isinstance(value, Decimal) else value


def assert_delta_is_the_model(key: Key, d: Delta, want: State) -> None:
    assert (d.usage.requests, d.usage.prompt_tokens, d.usage.completion_tokens, d.usage.cost) == (
        want.requests,
        want.prompt_tokens,
        want.completion_tokens,
        want.cost,
    ), key
    assert d.usage.total_tokens == want.prompt_tokens + want.completion_tokens, key
    assert d.usage.latency_count == len(want.latency) and abs(d.usage.latency_sum - sum(want.latency)) < 1e-9, key
    assert (d.first_seen, d.last_active) == (want.first_seen, want.last_active), key
    assert {day: (u.requests, u.cost) for day, u in d.days.items()} == want.days, key
    got_fields = {column: normalized(value) for column, (_, value) in d.fields.items()}
    want_fields = {
        c: (str(Decimal(v)) if c == "total_budget" and v is not None else v) for c, (_, v) in want.fields.items()
    }
    assert got_fields == want_fields, key
    got_subscriptions = {
        sid: (s.status, s.plan and s.plan.name, s.plan and s.plan.amount) for sid, (_, _, s) in d.subscriptions.items()
    }
    assert got_subscriptions == {sid: value for sid, (_, value) in want.subscriptions.items()}, key


def assert_plan_is_the_model(history: list[dict[str, Any]], changes: list[Change]) -> None:
    want = model(history)
    p = plan(changes, {})
    assert {(k[1], k[2]) for k in p.deltas} == set(want), "the live customers"
    for key, delta in p.deltas.items():
        assert_delta_is_the_model(key, delta, want[(key[1], key[2])])
        assert set(delta.fields) <= WRITABLE_COLUMNS, key
    tombstones = {c.key: max(d.time for d in changes if d.key == c.key and d.delete) for c in changes if c.delete}
    assert p.raised == tombstones
    for c, stale in zip(changes, p.stale, strict=True):
        assert stale == (not c.delete and c.key in tombstones and c.time <= tombstones[c.key]), c


FAST = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FAST
@given(histories(), st.randoms(use_true_random=False))
def test_a_batch_in_any_order_folds_into_the_models_state(history: list[dict[str, Any]], rng: random.Random) -> None:
    changes = changes_of(history)
    rng.shuffle(changes)
    assert_plan_is_the_model(history, changes)


@FAST
@given(histories(), st.integers(0, 80))
def test_a_stored_tombstone_makes_everything_before_it_stale(history: list[dict[str, Any]], hours: int) -> None:
    """A deletion folded in an earlier batch: this batch's changes for that customer stamped at
    or before it are stale, the rest fold as if the earlier ones never happened."""
    changes = changes_of(history)
    key = changes[0].key
    tombstone = NOW - timedelta(days=4) + timedelta(hours=hours)
    p = plan(changes, {key: tombstone})
    for c, stale in zip(changes, p.stale, strict=True):
        if c.key == key and not c.delete:
            final = max([tombstone, *(d.time for d in changes if d.key == key and d.delete)])
            assert stale == (c.time <= final), c
    survivors = [e for e, c in zip(history, changes, strict=True) if not (c.key == key and c.time <= tombstone)]
    want = model(survivors)
    assert {(k[1], k[2]) for k in p.deltas} == set(want)
    for k, delta in p.deltas.items():
        assert_delta_is_the_model(k, delta, want[(k[1], k[2])])


def test_the_fast_tier_can_fail() -> None:
    """The comparison is not vacuous: a history with its newest write dropped differs."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    history = [
        {
            "specversion": "1.0",
            "id": f"e{i}",
            "source": "crm",
            "type": "customer.upserted",
            "time": (at + timedelta(hours=i)).isoformat(),
            "subject": "alice",
            "environment": "prod",
            "data": {"name": name},
        }
        for i, name in enumerate(("old", "new"))
    ]
    changes = changes_of(history)
    try:
        assert_plan_is_the_model(history, changes[:1])
    except AssertionError:
        return
    raise AssertionError("a plan missing the newest write matched the model")


@given(
    st.dictionaries(st.dates(date(2024, 1, 1), date(2024, 12, 31)), st.integers(0, 10_000), max_size=40),
    st.dates(date(2024, 1, 1), date(2024, 12, 31)),
)
def test_window_costs_are_the_cost_of_the_days_in_each_window(costs: dict[date, int], today: date) -> None:
    """What a batch adds to the kept window sums is, for each window, the cost of its days in
    it: the 7 and 30 days ending today and the month so far, later days in none (as
    migration 0017's tally_window_sums adds up the daily rows)."""
    days = {day: Usage(cost=Decimal(cents) / 100) for day, cents in costs.items()}

    def cost(first: date) -> Decimal:
        return sum((u.cost for day, u in days.items() if first <= day <= today), Decimal(0))

    assert window_costs(days, today) == (
        cost(today - timedelta(days=6)),
        cost(today - timedelta(days=29)),
        cost(today.replace(day=1)),
    )
