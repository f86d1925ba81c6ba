"""Order independence, stated without the fold's code: random event histories (Hypothesis
strategies) and the reference model of the state they define. Shared by the property test
against the database (tests/test_order_independence.py) and the fast one of the pure fold
alone (tests/test_changes.py)."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

RETENTION = timedelta(days=35)
NOW = datetime.now(UTC).replace(microsecond=0)
BASE = NOW - timedelta(days=4)
SUBJECTS = ("alice", "bob", "carol")
STATUSES = ("active", "draft", "blacklisted", "archived")
EXAMPLES = int(os.environ.get("TALLY_PROPERTY_EXAMPLES", "60"))

# ---- histories --------------------------------------------------------------------------

times = st.integers(0, 72).map(lambda hours: BASE + timedelta(hours=hours))  # collisions on purpose
keys = st.tuples(st.sampled_from(SUBJECTS), st.sampled_from(("prod", "prod", "test")))
usage_data = st.fixed_dictionaries(
    {
        "requests": st.integers(1, 3),
        "prompt_tokens": st.integers(0, 40),
        "completion_tokens": st.integers(0, 40),
        "cost": st.sampled_from(["0", "0.001", "1.5", "0.333333333333", "7"]),
    },
    optional={
        "latency": st.sampled_from([0.25, 1.5, 3.0]),
        "model": st.sampled_from(["gpt-4o", "claude-sonnet", " ", ""]),
        "provider": st.sampled_from(["openai", "anthropic"]),
        "customer": st.fixed_dictionaries(
            {}, optional={"name": st.sampled_from(["Hint A", "Hint B"]), "email": st.just("hint@example.com")}
        ),
    },
)
profile_data = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["Ann", "Ben", None]),
        "email": st.sampled_from(["a@example.com", "b@example.com"]),
        "phone": st.sampled_from(["+1 555", "+44 20"]),
        "status": st.sampled_from(STATUSES),
        "metadata": st.sampled_from([{}, {"tier": "gold"}, {"tier": "free", "seats": 3}]),
        "total_budget": st.sampled_from(["10", "99.5"]),
        "address": st.sampled_from([{"city": "Lyon"}, {"city": "Oslo", "country": "NO"}]),
    },
)
subscription_data = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["sub_1", "sub_2"]),
        "status": st.sampled_from(["active", "trialing", "canceled"]),
        "plan": st.sampled_from([None, {"name": "Pro", "amount": 4999}, {"name": "Team", "amount": 9999}]),
    }
)
kinds = st.sampled_from(
    ["usage.recorded"] * 4 + ["customer.upserted"] * 2 + ["customer.deleted", "subscription.upserted"]
)


@st.composite
def event(draw: st.DrawFn, index: int) -> dict[str, Any]:
    kind = draw(kinds)
    subject, environment = draw(keys)
    data: dict[str, Any] = {}
    if kind == "usage.recorded":
        data = draw(usage_data)
    elif kind == "customer.upserted":
        data = draw(profile_data)
    elif kind == "subscription.upserted":
        data = draw(subscription_data)
    return {
        "specversion": "1.0",
        "id": f"e{index}",
        "source": draw(st.sampled_from(["gateway", "crm"])),
        "type": kind,
        "time": draw(times).isoformat(),
        "subject": subject,
        "environment": environment,
        "data": data,
    }


@st.composite
def schedules(draw: st.DrawFn) -> tuple[list[dict], list[tuple[list[dict], int, bool]]]:
    """A history, and how it reaches the fold: (batch, consumer 0 or 1, refolded)."""
    n = draw(st.integers(1, 28))
    history = [draw(event(i)) for i in range(n)]
    copies = draw(st.lists(st.sampled_from(history), max_size=4))  # duplicates sent again
    arrivals = draw(st.permutations(history + copies))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(arrivals) - 1)), max_size=6)))
    batches = [arrivals[a:b] for a, b in zip([0, *cuts], [*cuts, len(arrivals)], strict=True) if arrivals[a:b]]
    plan = [(b, draw(st.integers(0, 1)), draw(st.booleans())) for b in batches]
    return history, plan


# ---- the reference model ----------------------------------------------------------------


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in data.items() if k != "address"}
    if "status" in out and out["status"] is None:
        del out["status"]
    for part, value in (data.get("address") or {}).items():
        out[f"address_{part}"] = value
    return out


@dataclass
class State:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    latency: list[float] = field(default_factory=list)
    first_seen: datetime | None = None
    last_active: datetime | None = None
    days: dict[date, tuple[int, Decimal]] = field(default_factory=dict)
    # (day, model, provider) -> (requests, cost), for usage naming a model or provider ('' for
    # absent; a blank name is no name).
    models: dict[tuple[date, str, str], tuple[int, Decimal]] = field(default_factory=dict)
    fields: dict[str, tuple[tuple, Any]] = field(default_factory=dict)  # column -> (version, value)
    subscriptions: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)

    def write(self, column: str, version: tuple, value: Any) -> None:
        if column not in self.fields or self.fields[column][0] < version:
            self.fields[column] = (version, value)


def model(history: list[dict]) -> dict[tuple[str, str], State]:
    """The state the rules define, computed without the fold's code."""
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for e in history:
        by_key[(e["environment"], e["subject"])].append(e)
    out = {}
    for key, events in by_key.items():
        deletions = [datetime.fromisoformat(e["time"]) for e in events if e["type"] == "customer.deleted"]
        tombstone = max(deletions, default=None)
        live = [
            e
            for e in events
            if e["type"] != "customer.deleted" and (tombstone is None or datetime.fromisoformat(e["time"]) > tombstone)
        ]
        if not live:
            continue
        s = State()
        for e in live:
            t, d = datetime.fromisoformat(e["time"]), e["data"]
            rank = (t, e["source"], e["id"])
            if e["type"] == "usage.recorded":
                s.requests += d["requests"]
                s.prompt_tokens += d["prompt_tokens"]
                s.completion_tokens += d["completion_tokens"]
                s.cost += Decimal(d["cost"])
                if "latency" in d:
                    s.latency.append(d["latency"])
                s.first_seen = t if s.first_seen is None else min(s.first_seen, t)
                s.last_active = t if s.last_active is None else max(s.last_active, t)
                day = t.astimezone(UTC).date()
                requests, cost = s.days.get(day, (0, Decimal(0)))
                s.days[day] = (requests + d["requests"], cost + Decimal(d["cost"]))
                name, provider = d.get("model", "").strip(), d.get("provider", "")
                if name or provider:
                    requests, cost = s.models.get((day, name, provider), (0, Decimal(0)))
                    s.models[(day, name, provider)] = (requests + d["requests"], cost + Decimal(d["cost"]))
                for column, value in (d.get("customer") or {}).items():
                    s.write(column, (0, *rank), value)
            elif e["type"] == "customer.upserted":
                for column, value in _flatten(d).items():
                    s.write(column, (1, *rank), value)
            else:
                plan = d["plan"]
                value = (d["status"], plan and plan["name"], plan and plan["amount"])
                if d["id"] not in s.subscriptions or s.subscriptions[d["id"]][0] < rank:
                    s.subscriptions[d["id"]] = (rank, value)
        out[key] = s
    return out
