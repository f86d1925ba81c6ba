"""``tally demo``: publish a realistic synthetic stream so a newcomer sees a living list.

Several organizations, thousands of customers with skewed (Zipf-like) activity, a few weeks
of history weighted toward recent days, profile events with names and emails, and
subscriptions for a share of customers. Events go through the broker like any upstream's.
"""

from __future__ import annotations

import functools
import random
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from service.domain.errors import NotFound
from service.infra.broker import Names, encode_events, event_message
from service.infra.publisher import Publisher
from service.infra.settings import Settings
from service.store import auth

FIRST = (
    "Ada",
    "Grace",
    "Linus",
    "Margaret",
    "Ken",
    "Barbara",
    "Dennis",
    "Frances",
    "Edsger",
    "Radia",
    "Alan",
    "Katherine",
    "John",
    "Joan",
    "Donald",
    "Hedy",
    "Tim",
    "Sophie",
    "Guido",
    "Anita",
)
LAST = (
    "Lovelace",
    "Hopper",
    "Torvalds",
    "Hamilton",
    "Thompson",
    "Liskov",
    "Ritchie",
    "Allen",
    "Dijkstra",
    "Perlman",
    "Turing",
    "Johnson",
    "Backus",
    "Clarke",
    "Knuth",
    "Lamarr",
    "Berners-Lee",
    "Wilson",
    "Rossum",
    "Borg",
)
MODELS = (("small", 0.0000004, 0.0000016, 0.4), ("medium", 0.000003, 0.000015, 1.1), ("large", 0.000015, 0.000075, 2.6))
PLANS = (("price_starter", "Starter", 900), ("price_pro", "Pro", 4999), ("price_team", "Team", 19900))


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last_line = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.tty and now - self._last_line < 2 and self.done < self.total:
            return
        self._last_line = now
        share = self.done / self.total if self.total else 1
        rate = self.done / max(now - self.started, 1e-6)
        bar = "#" * int(share * 30)
        line = f"{self.label} [{bar:<30}] {self.done}/{self.total} ({share:.0%}, {rate:,.0f}/s)"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def generate(
    orgs: list[str],
    customers: int,
    events: int,
    days: int,
    seed: int,
    now: datetime,
    budgets: dict[tuple[str, str], Decimal] | None = None,
) -> Iterator[dict[str, object]]:
    """Yield ``events`` events (profiles and subscriptions first, then usage); the same
    arguments give the same stream. ``budgets`` gives (organization, customer) a lifetime
    budget, set by its profile event."""
    rng = random.Random(seed)
    people = []
    for i in range(customers):
        org = orgs[i % len(orgs)]
        first, last = rng.choice(FIRST), rng.choice(LAST)
        ident = f"user_{i:05d}"
        people.append((org, ident))
        profile: dict[str, object] = {
            "name": f"{first} {last}",
            "first_name": first,
            "last_name": last,
            "email": f"{first}.{last}.{i}@example.com".lower(),
            "metadata": {"plan_tier": rng.choice(("free", "growth", "enterprise"))},
        }
        if budgets and (org, ident) in budgets:
            profile["total_budget"] = str(budgets[(org, ident)])
        yield _event(org, ident, "customer.upserted", now - timedelta(days=days, hours=rng.random()), "crm", profile)
        if rng.random() < 0.3:
            price, name, amount = rng.choice(PLANS)
            start = now - timedelta(days=rng.randint(0, 27))
            yield _event(
                org,
                ident,
                "subscription.upserted",
                start,
                "billing",
                {
                    "id": f"sub_{uuid.UUID(int=rng.getrandbits(128)).hex[:14]}",
                    "status": rng.choice(("active", "active", "active", "trialing", "past_due", "canceled")),
                    "current_period_start": start.isoformat(),
                    "current_period_end": (start + timedelta(days=30)).isoformat(),
                    "plan": {
                        "stripe_price_id": price,
                        "name": name,
                        "amount": amount,
                        "currency": "usd",
                        "interval": "month",
                    },
                },
            )
    # Zipf-like weights: a few customers make most of the traffic, as in real gateways.
    weights = [1 / (rank + 1) ** 1.1 for rank in range(customers)]
    for org, ident in rng.choices(people, weights=weights, k=events):
        model, prompt_price, completion_price, latency = rng.choice(MODELS)
        prompt, completion = rng.randint(20, 4000), rng.randint(5, 1500)
        age = days * rng.random() ** 2  # recent days busier
        cost = prompt * prompt_price + completion * completion_price
        yield _event(
            org,
            ident,
            "usage.recorded",
            now - timedelta(days=age),
            "llm-gateway",
            {
                "requests": 1,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "cost": f"{cost:.8f}",
                "latency": round(latency * rng.lognormvariate(0, 0.4), 4),
                "ttft": round(0.25 * rng.lognormvariate(0, 0.5), 4),
                "model": model,
            },
        )


def _event(
    org: str, subject: str, kind: str, when: datetime, source: str, data: dict[str, object]
) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"evt_{uuid.uuid4().hex}",
        "source": source,
        "type": kind,
        "time": when.isoformat(),
        "subject": subject,
        "organization": org,
        "environment": "prod",
        "data": data,
    }


async def ensure_orgs(settings: Settings, names: list[str]) -> tuple[str, str]:
    """Create the demo organizations if missing; return fresh keys for the first: one that
    reads, and one that reads and writes."""
    conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    try:
        for name in names:
            try:
                await auth.find_organization(conn, name)
            except NotFound:
                await auth.create_organization(conn, name)
        read = await auth.create_key(conn, names[0], ("read",), name="demo")
        write = await auth.create_key(conn, names[0], ("read", "write"), name="demo")
        return read.key, write.key
    finally:
        await conn.close()


CENT = Decimal("0.01")


def demo_budgets(
    orgs: list[str], customers: int, events: int, days: int, seed: int, now: datetime
) -> dict[tuple[str, str], Decimal]:
    """Lifetime budgets for the first organization's two busiest customers: the busiest one's
    is half of what this stream makes it spend, so its alert fires once the consumer has folded
    half of its usage, whatever the stream's size; the next one's four times its spend, so its
    does not. (The stream is generated once more, without publishing, to know the spends.)"""
    busiest = [(orgs[0], f"user_{i:05d}") for i in range(0, min(customers, 2 * len(orgs)), len(orgs))]
    spend = dict.fromkeys(busiest, Decimal(0))
    for event in generate(orgs, customers, events, days, seed, now):
        key = (str(event["organization"]), str(event["subject"]))
        if event["type"] == "usage.recorded" and key in spend:
            data = event["data"]
            assert isinstance(data, dict)
            spend[key] += Decimal(str(data["cost"]))
    shares = (Decimal("0.5"), Decimal(4))
    return {key: max((spend[key] * share).quantize(CENT), CENT) for key, share in zip(busiest, shares, strict=False)}


async def run_demo(
    settings: Settings, *, orgs: int, customers: int, events: int, days: int, batch: int, seed: int
) -> int:
    org_names = [f"demo-{n}" for n in ("acme", "globex", "initech", "umbrella", "hooli")[: max(1, min(orgs, 5))]]
    read_key, write_key = await ensure_orgs(settings, org_names)
    now = datetime.now(UTC)
    budgets = demo_budgets(org_names, customers, events, days, seed, now)
    publisher = Publisher(settings.amqp_url, Names(settings.amqp_namespace))
    pending: list[dict[str, object]] = []
    progress = Progress(events, "publishing usage")
    try:
        for event in generate(org_names, customers, events, days, seed, now, budgets):
            pending.append(event)
            if len(pending) >= batch:
                await _flush(publisher, pending, progress)
        if pending:
            await _flush(publisher, pending, progress)
    finally:
        progress.finish()
        await publisher.close()
    base = f"http://localhost:{settings.http_port}"
    say = functools.partial(print, file=sys.stderr)
    say(f"published to {settings.amqp_namespace}.events for {', '.join(org_names)}; the consumer folds them in seconds")
    for (org, ident), budget in budgets.items():
        say(f"budget: {org}'s {ident} has a lifetime budget of ${budget}")
    say(
        f"a budget alert fires for {org_names[0]}'s user_00000 (its budget is half its spend): "
        f"'tally status' counts it in {settings.amqp_namespace}.alerts"
    )
    say(f"keys for {org_names[0]} (each shown once): the write key, then the read key on the last line")
    say("try:")
    say(f"  curl -H 'Authorization: Bearer {read_key}' '{base}/v1/customers?sort_by=-total_cost&limit=5'")
    patch = """'{"metadata": {"plan_tier": "enterprise"}}'"""
    say(f"  curl -X PATCH -H 'Authorization: Bearer {write_key}' {base}/v1/customers/user_00000 -d {patch}")
    print(f"write key: {write_key}")
    print(read_key)
    return 0


async def _flush(publisher: Publisher, pending: list[dict[str, object]], progress: Progress) -> None:
    await publisher.publish(event_message(encode_events(pending), batch=len(pending) > 1), routing_key="usage.recorded")
    progress.advance(sum(1 for e in pending if e["type"] == "usage.recorded"))
    pending.clear()
