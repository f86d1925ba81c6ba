"""Changes to customers and the in-memory fold: pure, no I/O (unit tested without a
database in tests/test_changes.py). ``service.store.fold`` writes what :func:`plan` decides.

A change is one event (or API write) for one customer; :func:`plan` folds a batch of them,
given each customer's tombstone, into one :class:`Delta` per customer — sums, days, the
newest value of each field — and says which changes are stale. The rules are the module
docstring of ``service.store.fold``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID
from zoneinfo import ZoneInfo

from service.domain.events import Event, ProfileData, SubscriptionData, UsageData

# (organization_id, environment, customer_identifier)
Key = tuple[UUID, str, str]

# ---- versions ---------------------------------------------------------------------------

# A usage event's name/email hint loses to any explicit write, whatever their times.
HINT, WRITE = 0, 1
# The profile fields a usage event may hint at (UsageData.customer).
HINT_COLUMNS = ("name", "email")
_YEAR_ONE = datetime(1, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    """The instant a version's microsecond count names (the inverse of :func:`version`'s)."""
    return _YEAR_ONE + micros * _MICROSECOND


def version(kind: int, at: datetime, source: str, change_id: str) -> str:
    """A write's version: ``'<kind>|<µs since 0001-01-01 UTC, 19 digits>|<source>|<id>'``.
    Compared as text — by code point in Python, ``COLLATE "C"`` in SQL, the same order — it
    orders by kind, then time, then source and id (migrations/0006_order_independence.sql has the SQL side)."""
    return f"{kind}|{(at - _YEAR_ONE) // _MICROSECOND:019d}|{source}|{change_id}"


# ---- changes and the in-memory fold -----------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One change to one customer at one time, from an event or an API write. Exactly one of
    ``usage``, ``profile`` (writable columns; ``{}`` for a bare creation), ``subscription`` or
    ``delete`` is set. Usage counts on its ``day``: the date of ``time`` in the organization's
    reporting time zone."""

    key: Key
    time: datetime
    source: str
    id: str
    usage: UsageData | None = None
    profile: Mapping[str, object] | None = None
    subscription: SubscriptionData | None = None
    delete: bool = False
    zone: ZoneInfo | timezone = UTC

    @classmethod
    def of(cls, organization_id: UUID, event: Event, zone: ZoneInfo | timezone = UTC) -> Change:
        key = (organization_id, event.environment, event.subject)
        data = event.data
        return cls(
            key,
            event.time,
            event.source,
            event.id,
            usage=data if isinstance(data, UsageData) else None,
            profile=data.columns() if isinstance(data, ProfileData) else None,
            subscription=data if isinstance(data, SubscriptionData) else None,
            delete=data is None,
            zone=zone,
        )

    @property
    def day(self) -> date:
        return self.time.astimezone(self.zone).date()

    def version(self, kind: int = WRITE) -> str:
        return version(kind, self.time, self.source, self.id)


# The amounts a usage event adds, by name, in the order Usage.sums gives them: one list, from
# which the store writes daily and lifetime sums alike.
USAGE_SUMS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "latency_sum",
    "latency_count",
    "ttft_sum",
    "ttft_count",
)


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: Decimal = Decimal(0)
    latency_sum: float = 0.0
    latency_count: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def sums(self) -> tuple[int, int, int, int, Decimal, float, int, float, int]:
        """The amounts in the order of USAGE_SUMS (the column order of daily_usage and
        customer_usage)."""
        return (
            self.requests,
            self.prompt_tokens,
            self.completion_tokens,
            self.total_tokens,
            self.cost,
            self.latency_sum,
            self.latency_count,
            self.ttft_sum,
            self.ttft_count,
        )

    def add(self, u: UsageData) -> None:
        self.requests += u.requests
        self.prompt_tokens += u.prompt_tokens
        self.completion_tokens += u.completion_tokens
        self.total_tokens += u.total_tokens or 0
        self.cost += u.cost
        if u.latency is not None:
            self.latency_sum += u.latency
            self.latency_count += 1
        if u.ttft is not None:
            self.ttft_sum += u.ttft
            self.ttft_count += 1


def window_costs(days: Mapping[date, Usage], today: date) -> tuple[Decimal, Decimal, Decimal]:
    """What ``days`` (a delta's cost per day) add to a customer's window sums ending on
    ``today``: the last 7 days, the last 30 days and the calendar month so far, today
    included and later days not (as migration 0017's ``tally_window_sums`` adds up the
    daily rows)."""
    last_7 = last_30 = month = Decimal(0)
    first_of_month = today.replace(day=1)
    for day, usage in days.items():
        if day > today:
            continue
        age = (today - day).days
        if age < 7:
            last_7 += usage.cost
        if age < 30:
            last_30 += usage.cost
        if day >= first_of_month:
            month += usage.cost
    return last_7, last_30, month


@dataclass
class Delta:
    """What a batch's live changes do to one customer."""

    usage: Usage = field(default_factory=Usage)
    days: dict[date, Usage] = field(default_factory=lambda: defaultdict(Usage))
    # Per day (as ``days``), model and provider ('' for absent), the usage of events that name either:
    # empty when none does, and then the store writes no per-model row at all.
    models: dict[tuple[date, str, str], Usage] = field(default_factory=lambda: defaultdict(Usage))
    first_seen: datetime | None = None
    last_active: datetime | None = None
    fields: dict[str, tuple[str, object]] = field(default_factory=dict)  # column -> (version, value)
    hints: dict[str, tuple[str, object]] = field(default_factory=dict)  # the best hint per column
    subscriptions: dict[str, tuple[str, datetime, SubscriptionData]] = field(default_factory=dict)
    # The newest profile or subscription change (usage has last_active): with it, liveness.
    profile_event_at: datetime | None = None

    def _write(self, column: str, stamp: str, value: object) -> None:
        if column not in self.fields or self.fields[column][0] < stamp:
            self.fields[column] = (stamp, value)

    def add(self, change: Change) -> None:
        t = change.time
        if change.usage is None:
            self.profile_event_at = t if self.profile_event_at is None else max(self.profile_event_at, t)
        if change.usage is not None:
            self.usage.add(change.usage)
            day = change.day
            self.days[day].add(change.usage)
            if change.usage.model is not None or change.usage.provider is not None:
                self.models[(day, change.usage.model or "", change.usage.provider or "")].add(change.usage)
            self.first_seen = t if self.first_seen is None else min(self.first_seen, t)
            self.last_active = t if self.last_active is None else max(self.last_active, t)
            hint = change.usage.customer
            if hint is not None:
                stamp = change.version(HINT)
                for column in HINT_COLUMNS:
                    value = getattr(hint, column)
                    if value:
                        self._write(column, stamp, value)
                        if column not in self.hints or self.hints[column][0] < stamp:
                            self.hints[column] = (stamp, value)
        elif change.profile is not None:
            stamp = change.version()
            for column, value in change.profile.items():
                self._write(column, stamp, value)
        elif change.subscription is not None:
            sub, stamp = change.subscription, change.version()
            if sub.id not in self.subscriptions or self.subscriptions[sub.id][0] < stamp:
                self.subscriptions[sub.id] = (stamp, t, sub)


@dataclass
class Plan:
    """The in-memory fold of a batch: per customer, the live changes' delta; the tombstones
    the batch raises; and which changes are stale."""

    deltas: dict[Key, Delta]
    raised: dict[Key, datetime]  # key -> the new tombstone, where the batch raises it
    stale: list[bool]


def plan(changes: Sequence[Change], tombstones: Mapping[Key, datetime]) -> Plan:
    """Fold ``changes`` given each customer's current tombstone. Pure: the same changes and
    tombstones give the same plan in any order. A change at or before its customer's final
    tombstone (the newer of the stored one and the batch's own deletions) is stale."""
    final: dict[Key, datetime] = dict(tombstones)
    raised: dict[Key, datetime] = {}
    for c in changes:
        if c.delete and (c.key not in final or c.time > final[c.key]):
            final[c.key] = raised[c.key] = c.time
    deltas: dict[Key, Delta] = {}
    stale = [False] * len(changes)
    for i, c in enumerate(changes):
        if c.delete:
            continue
        if c.key in final and c.time <= final[c.key]:
            stale[i] = True
            continue
        deltas.setdefault(c.key, Delta()).add(c)
    return Plan(deltas, raised, stale)
