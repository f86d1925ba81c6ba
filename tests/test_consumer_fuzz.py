"""AMQP fuzzing of the consumer: hypothesis generates messages — random bytes, JSON values of
random shapes, valid events with mutated fields, batches mixing good and bad events, empty
and huge batches, nesting 0–1,100 levels deep, NUL characters in strings and keys, extreme
dates, 30-digit integers, long strings and types, odd content types and routing keys — and
publishes each example between known-good events, to one real `tally consume` process that
runs for the whole test.

After each example: every message is applied or dead-lettered with an ``x-tally-reason``
on its first delivery, the good events around it (and inside its batches) are applied,
and the process is the same one, alive, and has logged nothing critical. A dead letter
whose reason is an internal error is a bug that some input brought out: the fuzz test
fails on it, with the minimal input that does it.

Inputs found before (by hand, by a hostile probe, or by this test) run first,
as explicit examples, on every run; each example also runs "alone" now and then, without a
good event in its batch, since a batch where nothing applies takes its own path through the
fold. `TALLY_FUZZ_EXAMPLES=500` explores further on a workstation.

Hypothesis drives a plain (sync) function: each example runs its own event loop, with its
own broker and database connections, so pytest-asyncio's session loop is never entered
from inside hypothesis.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import aiohttp
import asyncpg
import orjson
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from service.infra.broker import (
    ATTEMPT_HEADER,
    REASON_HEADER,
    ROUTING_KEY_HEADER,
    declare,
    delete_namespace,
    routable,
)
from service.infra.settings import Settings
from service.store import auth
from tests.eventkit import AMQP_URL, Broker, usage, wait_until
from tests.processes import TallyProcess

# Modest, and derandomized, so that CI runs the same examples every time (each example is
# a few hundred milliseconds of real broker and database work).
MAX_EXAMPLES = int(os.environ.get("TALLY_FUZZ_EXAMPLES", "60"))
# A dead letter with a reason starting so means a bug (a crash caught by the safety net).
BUG_REASONS = ("internal error",)
# Generous: one example holds at most a few thousand events; only a stall gets near it.
EXAMPLE_TIMEOUT = 60.0
NUL = "\x00"
EVENT_TYPES = ("usage.recorded", "customer.upserted", "customer.deleted", "subscription.upserted")
ROUTING_PREFIXES = ("usage.", "customer.", "subscription.", "usage", "customer")
# The broker refuses routing keys over 255 bytes at publish: the longest one it can carry.
MAX_ROUTING_KEY_BYTES = 255
EXTREME_TIMES = (
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+05:00",
    "0001-01-01T00:00:00-05:00",
    "0001-01-01",
    "9999-12-31T23:59:59-14:00",
    "9999-12-31T23:59:59+14:00",
    "9999-12-31T23:59:59.999999Z",
    "9999-12-31",
    "0000-01-01T00:00:00Z",
    "2026-02-30T00:00:00Z",
    "1970-01-01T00:00:00Z",
    "+275760-09-13T00:00:00Z",
    "2026-11-21T10:00:00+24:00",
    "2026-11-21T24:00:00Z",
    "",
    "now",
    "1e10",
)
# A placeholder for a value nested ``depth`` levels deep, spliced into the JSON text after
# encoding (json.dumps would recurse past Python's stack limit for the deepest ones).
DEEP = re.compile(r'"\\u0001deep(\d+)([aon])\\u0001"')

T = TypeVar("T")


# ---- strategies --------------------------------------------------------------------------


def nul_texts(max_size: int = 20) -> st.SearchStrategy[str]:
    """Any text, now and then with a NUL character in it (often enough to reach every
    field, rarely enough that the other faults of an event are reached too)."""
    plain = st.text(max_size=max_size)
    return st.one_of(plain, plain, plain, plain, plain.map(lambda s: s + NUL), plain.map(lambda s: NUL + s))


def long_texts() -> st.SearchStrategy[str]:
    return st.tuples(st.integers(256, 200_000), st.booleans()).map(lambda t: "x" * t[0] + (NUL if t[1] else ""))


def times() -> st.SearchStrategy[str]:
    offsets = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
    return st.one_of(
        st.sampled_from(EXTREME_TIMES),
        st.datetimes(timezones=offsets).map(lambda d: d.isoformat()),  # year 1 to 9999, any offset
        st.integers(60, 40 * 86_400).map(lambda s: (datetime.now(UTC) - timedelta(seconds=s)).isoformat()),
    )


HUGE_INTEGERS = st.one_of(
    st.integers(10**29, 10**30 - 1),
    st.integers(-(10**30) + 1, -(10**29)),
    st.sampled_from([2**53 + 1, 2**63, -(2**63) - 1, 2**64]),
)
# Nesting depths: anywhere in 0-1,100, and often at the edges that matter (a validation
# bound, orjson.dumps' 255 levels, the decoder's 1,024).
DEPTHS = st.one_of(st.integers(0, 1100), st.sampled_from([63, 64, 65, 254, 255, 256, 300, 1000, 1019, 1024, 1100]))
DEEP_VALUES = st.builds(lambda d, shape: f"\x01deep{d}{shape}\x01", DEPTHS, st.sampled_from("oona"))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    HUGE_INTEGERS,
    st.floats(allow_nan=False, allow_infinity=False),
    nul_texts(),
    times(),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(nul_texts(10), children, max_size=4),
    max_leaves=10,
)
FIELD_VALUES = st.one_of(JSON_VALUES, times(), HUGE_INTEGERS, long_texts(), DEEP_VALUES)
TYPES = st.one_of(
    st.sampled_from(EVENT_TYPES),
    nul_texts(),
    st.integers(250, 70_000).map(lambda n: "usage." + "x" * n),  # past a routing key's 255 bytes
)
# Where a mutation lands: every envelope field, and data fields of every event type.
PATHS = (
    ("specversion",),
    ("id",),
    ("source",),
    ("type",),
    ("time",),
    ("subject",),
    ("organization",),
    ("environment",),
    ("data",),
    ("data", "requests"),
    ("data", "prompt_tokens"),
    ("data", "total_tokens"),
    ("data", "cost"),
    ("data", "latency"),
    ("data", "ttft"),
    ("data", "customer"),
    ("data", "customer", "name"),
    ("data", "name"),
    ("data", "email"),
    ("data", "status"),
    ("data", "metadata"),
    ("data", "metadata", "k"),
    ("data", "address"),
    ("data", "address", "city"),
    ("data", "last_purchase_date"),
    ("data", "total_budget"),
    ("data", "period_budget"),
    ("data", "budget_duration"),
    ("data", "last_transaction_amount"),
    ("data", "id"),
    ("data", "current_period_start"),
    ("data", "current_period_end"),
    ("data", "plan"),
    ("data", "plan", "amount"),
    ("data", "plan", "name"),
)


@dataclass
class Fuzzed:
    """One message of an example: what the consumer receives, and which good events (by id)
    a batch holds among the bad."""

    body: bytes
    content_type: str | None
    routing_key: str
    good: list[dict] = field(default_factory=list)
    kind: str = ""  # how it was made: bytes, value, event, batch, deep (where, levels), huge, large
    message_id: str = ""

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints examples so
        printer.text(repr(self))

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: keep it legible
        body = self.body if len(self.body) <= 600 else self.body[:300] + b"..." + self.body[-100:]
        return (
            f"Fuzzed({self.kind}: body={body!r} ({len(self.body)} bytes), content_type={self.content_type!r}, "
            f"routing_key={self.routing_key!r})"
        )


def template(kind: str, org: str, subject: str, event_id: str, when: str) -> dict:
    """A valid event of each type, to mutate."""
    base = {
        "specversion": "1.0",
        "id": event_id,
        "source": "fuzz",
        "type": kind,
        "time": when,
        "subject": subject,
        "organization": org,
        "environment": "prod",
    }
    data: dict[str, Any] = {
        "usage.recorded": {
            "requests": 1,
            "prompt_tokens": 12,
            "completion_tokens": 3,
            "cost": "0.0012",
            "latency": 0.5,
            "ttft": 0.1,
            "customer": {"name": "Ann", "email": "ann@example.com"},
        },
        "customer.upserted": {
            "name": "Ann",
            "email": "ann@example.com",
            "status": "active",
            "metadata": {"tier": "gold"},
            "address": {"city": "Lyon"},
            "total_budget": "10",
        },
        "customer.deleted": {},
        "subscription.upserted": {
            "id": "sub_1",
            "status": "active",
            "current_period_start": when,
            "current_period_end": when,
            "plan": {
                "stripe_price_id": "price_1",
                "name": "Pro",
                "amount": 4999,
                "currency": "usd",
                "interval": "month",
            },
        },
    }[kind]
    return {**base, "data": data}


def mutate(event: dict, operations: list[tuple[tuple[str, ...], object, bool]]) -> dict:
    """Set (or, with ``delete``, remove) a field at each path; paths through non-objects are skipped."""
    event = json.loads(json.dumps(event))
    for path, value, delete in operations:
        node: object = event
        for key in path[:-1]:
            if not isinstance(node, dict):
                break
            node = node.setdefault(key, {})
        if isinstance(node, dict):
            if delete:
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
    return event


def encode(value: object, ascii_only: bool) -> bytes:
    """JSON text of a generated value (big integers exact, NULs escaped), with its deep
    placeholders spliced in."""

    def nested(match: re.Match[str]) -> str:
        depth, shape = int(match.group(1)), match.group(2)
        if shape == "a":
            return "[" * depth + "]" * depth
        key = '"\\u0000"' if shape == "n" else '"k"'
        return f"{{{key}:" * depth + "null" + "}" * depth

    return DEEP.sub(nested, json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"))).encode(
        "utf-8", "surrogatepass"
    )


@st.composite
def events(draw: st.DrawFn, org: str, org_id: str) -> dict:
    """A valid event of a random type, usually with a few fields mutated."""
    # Each event is faulty in one place: its envelope, or its data (or nowhere). An event
    # has one reason to die, so a fault in the envelope would hide every fault in the data.
    site = draw(st.sampled_from(["data", "data", "data", "envelope", "none"]))
    kind = draw(st.sampled_from(EVENT_TYPES))
    owner, subject, event_id = org, draw(st.sampled_from(["fz_a", "fz_b", "fz_c"])), f"fz_{uuid.uuid4().hex}"
    when = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    paths = [p for p in PATHS if (p[0] == "data") == (site == "data")]
    if site == "envelope":
        owner = draw(st.sampled_from([org, org_id, "no-such-org-anywhere"]))
        subject = draw(st.one_of(st.just(subject), st.text(max_size=30), long_texts()))
        event_id = draw(st.one_of(st.just(event_id), st.sampled_from(["fz_dup1", "fz_dup2"]), nul_texts()))
        when = draw(st.one_of(st.just(when), times()))
    else:
        owner = draw(st.sampled_from([org, org, org_id]))
    event = template(kind, owner, subject, event_id, when)
    if site == "none":
        return event
    if site == "data":
        paths.append(("data", draw(st.text(max_size=10))))
    mutations = draw(st.lists(st.tuples(st.sampled_from(paths), FIELD_VALUES, st.booleans()), max_size=3))
    if site == "envelope" and draw(st.booleans()):
        mutations.append((("type",), draw(TYPES), False))
    return mutate(event, mutations)


def good_event(org: str) -> dict:
    return usage(org, f"fz_good_{uuid.uuid4().hex[:12]}", source="fuzz-good")


@st.composite
def messages(draw: st.DrawFn, org: str, org_id: str) -> Fuzzed:
    content_type = draw(
        st.one_of(
            st.none(),
            st.sampled_from(
                [
                    "application/cloudevents+json",
                    "application/cloudevents-batch+json",
                    "application/json",
                    "text/plain",
                    "",
                ]
            ),
            st.text(max_size=40),
        )
    )
    if draw(st.booleans()):
        routing_key = draw(st.sampled_from(EVENT_TYPES))
    else:
        raw = (draw(st.sampled_from(ROUTING_PREFIXES)) + draw(st.text(max_size=300))).encode()
        routing_key = raw[:MAX_ROUTING_KEY_BYTES].decode(errors="ignore")
        if not routable(routing_key):
            # A key no binding routes is dead-lettered whole (tests/test_amqp_contract.py): here the
            # message must be routed for its body's fate to be judged.
            routing_key = "usage." + routing_key
            routing_key = routing_key.encode()[:MAX_ROUTING_KEY_BYTES].decode(errors="ignore")
    ascii_only = draw(st.booleans())
    # Weighted by repetition: single events and batches are where the faults are; huge and
    # large batches cost a second or more each and hold one fault at most.
    kind = draw(
        st.sampled_from(
            ["event", "event", "event", "batch", "batch", "batch", "deep", "deep", "bytes", "value", "huge", "large"]
        )
    )
    good: list[dict] = []
    if kind == "bytes":
        body = draw(st.binary(max_size=2_000))
    elif kind == "value":
        body = encode(draw(JSON_VALUES), ascii_only)
    elif kind == "event":
        body = encode(draw(events(org, org_id)), ascii_only)
    elif kind == "batch":  # good and bad events (and non-events) side by side; maybe empty
        parts = []
        for item in draw(st.lists(st.sampled_from(["good", "event", "value"]), max_size=8)):
            if item == "good":
                good.append(good_event(org))
                parts.append(orjson.dumps(good[-1]))
            elif item == "event":
                parts.append(encode(draw(events(org, org_id)), ascii_only))
            else:
                parts.append(encode(draw(JSON_VALUES), ascii_only))
        body = b"[" + b",".join(parts) + b"]"
    elif kind == "deep":  # the whole body, or an event's data, nested 0-1,100 levels deep
        depth = draw(DEPTHS)
        where = draw(st.sampled_from(["body", "metadata", "metadata", "data", "batch"]))
        hole = f"\x01deep{depth}{draw(st.sampled_from('oona'))}\x01"
        if where == "body":
            body = encode(hole, ascii_only)
        else:
            event = template(
                "customer.upserted", org, "fz_deep", f"fz_{uuid.uuid4().hex}", datetime.now(UTC).isoformat()
            )
            event["data"] = {"metadata": hole} if where != "data" else hole
            if where == "batch":
                good.append(good_event(org))
            body = encode([*good, event] if where == "batch" else event, ascii_only)
    elif kind == "huge":  # more events than a message may hold: refused as a whole
        body = b"[" + b",".join([b"{}"] * 10_001) + b"]"
    else:  # a large valid batch, around and past the consumer's batch size
        good = [good_event(org) for _ in range(draw(st.sampled_from([1, 2, 999, 1000, 1001, 2500])))]
        body = orjson.dumps(good)
    if kind == "deep":
        kind = f"deep ({where}, {depth} levels)"
    return Fuzzed(body, content_type, routing_key, good, kind)


def known_cases(org: str) -> list[list[Fuzzed]]:
    """Inputs found by hand or by this test before, run first on every run (explicit
    examples): each in a batch between good events, so the batch's fate is judged too."""
    now = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()

    def event(kind: str, **changes: object) -> dict:
        e = template(kind, org, "fz_known", f"fz_{uuid.uuid4().hex}", now)
        for path, value in changes.items():
            e = mutate(e, [(tuple(path.split("__")), value, False)])
        return e

    def batch(bad: object, name: str) -> list[Fuzzed]:
        good = [good_event(org), good_event(org)]
        body = b"[" + b",".join([orjson.dumps(good[0]), encode(bad, False), orjson.dumps(good[1])]) + b"]"
        return [Fuzzed(body, "application/cloudevents-batch+json", "usage.recorded", good, f"known: {name}")]

    def single(bad: dict, name: str) -> list[Fuzzed]:
        return [Fuzzed(encode(bad, False), "application/cloudevents+json", "usage.recorded", [], f"known: {name}")]

    return [
        # Alone (the explicit examples run each case alone too), a batch where nothing applies.
        single(event("usage.recorded", organization="no-such-org-anywhere"), "unknown organization"),
        single(event("usage.recorded", time="2001-01-01T00:00:00Z"), "older than the dedupe window"),
        batch(event("usage.recorded", type="usage." + "x" * 294), "type of 300 bytes"),
        batch(event("customer.upserted", data__metadata="\x01deep300o\x01"), "metadata 300 levels deep"),
        batch(event("customer.upserted", data__metadata="\x01deep1000n\x01"), "metadata 1,000 levels deep, NUL keys"),
        batch(event("usage.recorded", subject="fz\x00nul"), "NUL in subject"),
        batch(event("usage.recorded", id="fz\x00" + uuid.uuid4().hex), "NUL in id"),
        batch(event("customer.upserted", data__metadata={"k\x00": 1}), "NUL in a metadata key"),
        batch(event("customer.upserted", data__metadata={"k": "v\x00"}), "NUL in a metadata value"),
        batch(event("customer.upserted", data__name="Ann\x00"), "NUL in a profile field"),
        batch(
            event("subscription.upserted", data__current_period_end="0001-01-01T00:00:00+05:00"),
            "period end at year 1, +05:00",
        ),
        batch(
            event("subscription.upserted", data__current_period_start="9999-12-31T23:59:59-14:00"),
            "period start at year 9999, -14:00",
        ),
        batch(
            event("customer.upserted", data__last_purchase_date="9999-12-31T23:59:59-14:00"),
            "last purchase at year 9999, -14:00",
        ),
        batch(
            event("customer.upserted", data__last_purchase_date="0001-01-01T00:00:00+01:00"),
            "last purchase at year 1, +01:00",
        ),
        batch(event("usage.recorded", time="0001-01-01T00:00:00+05:00"), "event time at year 1, +05:00"),
        batch(event("usage.recorded", time="9999-12-31T23:59:59-14:00"), "event time at year 9999, -14:00"),
        batch(
            event("customer.upserted", data__metadata={"n": 123456789012345678901234567890}),
            "30-digit integer in metadata",
        ),
        batch(
            event("customer.upserted", data__last_transaction_amount=123456789012345678901234567890), "30-digit amount"
        ),
        batch(event("usage.recorded", data__prompt_tokens=123456789012345678901234567890), "30-digit count"),
        batch(
            event("subscription.upserted", data__plan__amount=123456789012345678901234567890), "30-digit plan amount"
        ),
        batch(event("usage.recorded", data__cost="1e-30"), "cost 1e-30"),
    ]


# ---- the harness: one consumer process, examples run on their own event loops ------------


def run(coroutine: Callable[[], Awaitable[T]]) -> T:
    # A loop of its own, not installed as the thread's current loop (asyncio.run would
    # unset pytest-asyncio's session loop when it finishes).
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coroutine())


class Harness:
    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.broker = Broker()  # only its private names: connections are made per example
        self.names = self.broker.names
        self.log_dir = log_dir
        self.process: TallyProcess | None = None
        self.first_pid: int | None = None
        self.restarts = 0
        self.clean = False
        self.org = self.org_id = ""
        self.log_offset = 0
        # What the examples brought about, printed at the end (pytest -s) to see the mix.
        self.seen: Counter[str] = Counter()

    # -- lifecycle

    async def setup(self) -> None:
        connection = await aio_pika.connect(AMQP_URL)
        try:
            await declare(connection, await connection.channel(), self.names)
        finally:
            await connection.close()
        conn = await asyncpg.connect(self.settings.database_url)
        try:
            self.org = f"fuzz-{uuid.uuid4().hex[:10]}"
            self.org_id = str(await auth.create_organization(conn, self.org))
        finally:
            await conn.close()

    async def ensure_consumer(self) -> None:
        """The consumer, running and idle before an example. After a failed example (a
        crash, a stall, leftovers), a fresh process on empty queues: the next example,
        hypothesis's shrinking included, is judged on its own."""
        if self.clean and self.process is not None and self.process.alive():
            return
        if self.process is not None:
            self.process.close()
            self.restarts += 1
        connection = await aio_pika.connect(AMQP_URL)
        try:
            channel = await connection.channel()
            for queue in (self.names.ingest, self.names.dead):
                await (await channel.declare_queue(queue, passive=True)).purge()
        finally:
            await connection.close()
        self.process = TallyProcess(
            f"fuzz{self.restarts}", self.settings, self.broker, self.log_dir, {"TALLY_DB_POOL_MAX": "4"}
        )
        self.first_pid = self.first_pid or self.process.proc.pid
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            await self.process.wait_ready(http)
        self.log_offset = 0
        self.clean = True

    async def teardown(self) -> None:
        try:
            if self.process is not None and self.process.alive():
                rc = await self.process.terminate()
                assert rc == 0, f"exit code {rc} after SIGTERM\n{self.process.tail()}"
        finally:
            if self.process is not None:
                self.process.close()
            connection = await aio_pika.connect(AMQP_URL)
            try:
                await delete_namespace(connection, self.names)
            finally:
                await connection.close()

    # -- one example

    def example(self, case: list[Fuzzed], alone: bool = False) -> None:
        run(self.ensure_consumer)
        self.clean = False  # until the example passes
        run(lambda: self.check(case, alone))
        self.clean = True

    async def check(self, case: list[Fuzzed], alone: bool) -> None:
        """Publish the case between good events and judge what became of it. ``alone``: no
        good event before it, and the one after it only once the consumer has taken the
        case, so that the case's messages are likely a batch of their own (a batch where
        nothing applies takes other paths through the fold)."""
        assert self.process is not None
        process = self.process
        before, after, barrier = good_event(self.org), good_event(self.org), good_event(self.org)
        connection = await aio_pika.connect(AMQP_URL)
        db = await asyncpg.connect(self.settings.database_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            topology = await declare(connection, channel, self.names)

            async def publish(body: bytes, content_type: str | None, routing_key: str, message_id: str) -> None:
                await topology.events.publish(
                    aio_pika.Message(
                        body,
                        content_type=content_type,
                        message_id=message_id,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=routing_key,
                    mandatory=True,  # an unroutable message would vanish unseen
                )

            if not alone:
                await publish(orjson.dumps(before), "application/cloudevents+json", "usage.recorded", "good-before")
            for i, message in enumerate(case):
                message.message_id = f"fuzz-{i}"
                await publish(message.body, message.content_type, message.routing_key, message.message_id)
            if alone:

                async def taken() -> bool:
                    """Delivered and acked: none ready in the queue, none in the consumer's hands."""
                    process.check_alive()
                    ingest = await channel.declare_queue(self.names.ingest, passive=True)
                    if ingest.declaration_result.message_count:
                        return False
                    async with aiohttp.ClientSession() as http, http.get(process.url + "/metrics") as r:
                        found = re.search(r"^tally_messages_in_flight (\S+)$", await r.text(), re.MULTILINE)
                    return found is not None and float(found.group(1)) == 0

                await wait_until(taken, timeout=EXAMPLE_TIMEOUT, what="the case taken by the consumer")
            await publish(orjson.dumps(after), "application/cloudevents+json", "usage.recorded", "good-after")
            # Good events inside a batch apply unless the body as a whole cannot be decoded
            # (nested past the JSON decoder's 1,024 levels): then the message is refused whole.
            good = [*([] if alone else [before]), *(e for m in case if decodable(m.body) for e in m.good), after]
            await self.wait_applied(db, good, process)
            # The consumer works batch by batch: once an event published after `after` is
            # applied, every batch before it has published its dead letters and acked.
            await publish(orjson.dumps(barrier), "application/cloudevents+json", "usage.recorded", "good-barrier")
            await self.wait_applied(db, [barrier], process)

            dead = await channel.declare_queue(self.names.dead, passive=True)
            letters = []
            while (letter := await dead.get(no_ack=True, fail=False)) is not None:
                letters.append(letter)
            await self.check_letters(db, case, letters)
        finally:
            await db.close()
            await connection.close()
        self.check_process(process)

    async def wait_applied(self, db: asyncpg.Connection, good: list[dict], process: TallyProcess) -> None:
        ids = [e["id"] for e in good]

        async def applied() -> bool:
            process.check_alive()
            self.check_log(process, ("critical",))
            found = await db.fetchval(
                "SELECT count(*) FROM processed_events WHERE organization_id = $1 AND source = 'fuzz-good'"
                " AND event_id = ANY($2::text[])",
                uuid.UUID(self.org_id),
                ids,
            )
            return found == len(set(ids))

        await wait_until(applied, timeout=EXAMPLE_TIMEOUT, what=f"{len(ids)} good events applied")

    async def check_letters(self, db: asyncpg.Connection, case: list[Fuzzed], letters: list) -> None:
        by_id = {m.message_id: m for m in case}
        self.seen.update(["messages"] * len(case) + ["dead letters"] * len(letters))
        for letter in letters:
            headers = letter.headers or {}
            reason = str(headers.get(REASON_HEADER) or "")
            self.seen[re.sub(r"\d+|'.*|: .*", "#", reason)[:50]] += 1
            origin = by_id.get(letter.message_id)
            assert origin is not None, f"a good message was dead-lettered: {letter.message_id} {reason!r}"
            assert reason, f"a dead letter without a reason, from {origin!r}"
            assert not reason.startswith(BUG_REASONS), f"a bug: {reason!r}, from {origin!r}"
            assert "x-death" not in headers and headers.get(ATTEMPT_HEADER) == 1, (
                f"dead-lettered after more than one delivery: {headers!r}, from {origin!r}"
            )
            assert letter.routing_key == origin.routing_key == headers.get(ROUTING_KEY_HEADER), (
                letter.routing_key,
                headers.get(ROUTING_KEY_HEADER),
                origin,
            )
        for message in case:
            await self.check_accounted(
                db, message, [letter for letter in letters if letter.message_id == message.message_id]
            )

    async def check_accounted(self, db: asyncpg.Connection, message: Fuzzed, letters: list) -> None:
        """Every event of the message was applied (its dedupe key is recorded, as for a
        duplicate or a stale event) or dead-lettered; or the whole message was."""
        if len(letters) == 1 and letters[0].body == message.body:
            return  # refused as a whole (any good events inside were checked as applied)
        try:
            decoded = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            raise AssertionError(f"an undecodable message not dead-lettered as it came: {message!r}") from None
        items = decoded if isinstance(decoded, list) else [decoded]
        dead = []
        for letter in letters:
            try:
                dead.append(orjson.loads(letter.body))
            except orjson.JSONDecodeError:
                raise AssertionError(f"a dead letter that is not one event of {message!r}") from None
        keys = {(e["source"], e["id"]) for e in items if self.ours(e)}
        found = {
            (r["source"], r["event_id"])
            for r in await db.fetch(
                "SELECT source, event_id FROM processed_events WHERE organization_id = $1"
                " AND (source, event_id) IN (SELECT * FROM unnest($2::text[], $3::text[]))",
                uuid.UUID(self.org_id),
                [k[0] for k in keys],
                [k[1] for k in keys],
            )
        }
        unmatched = list(range(len(dead)))
        for item in items:
            match = next((i for i in unmatched if same_json(dead[i], item)), None)
            if match is not None:
                unmatched.remove(match)
            else:
                assert self.ours(item) and (item["source"], item["id"]) in found, (
                    f"an event neither applied nor dead-lettered: {str(item)[:500]}, in {message!r}"
                )
                self.seen["applied (or duplicate, or stale)"] += 1
        assert not unmatched, f"dead letters that are no event of {message!r}"

    def ours(self, item: object) -> bool:
        """An event the fold could have recorded: our organization, text keys without NUL."""
        return (
            isinstance(item, dict)
            and item.get("organization") in (self.org, self.org_id)
            and all(isinstance(item.get(k), str) and NUL not in item[k] for k in ("source", "id"))
        )

    def check_log(self, process: TallyProcess, levels: tuple[str, ...] = ("critical", "error")) -> None:
        """No line at these levels since the last look (a critical line is a crash; an error
        line from the consumer is a bug it caught)."""
        text = process.log_text()
        end = text.rfind("\n") + 1  # whole lines only: the last one may be half written
        for line in text[self.log_offset : end].splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("level") in levels:
                raise AssertionError(f"the consumer logged {entry.get('level')}: {line[:3000]}")
        if "error" in levels:
            self.log_offset = end

    def check_process(self, process: TallyProcess, *, first: bool = False) -> None:
        """Alive and quiet; with ``first``, also the very process the test started."""
        process.check_alive()
        self.check_log(process)
        if first:
            assert process.proc.pid == self.first_pid and self.restarts == 0, "the consumer was restarted"


def decodable(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


def same_json(a: object, b: object) -> bool:
    """Deep equality of decoded JSON without recursion (values may nest 1,000 levels)."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if isinstance(x, dict) and isinstance(y, dict):
            if list(x) != list(y):
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif type(x) is not type(y) or x != y:
            return False
    return True


# ---- the test ------------------------------------------------------------------------------


def test_no_message_makes_the_consumer_exit(settings: Settings, migrated: str, tmp_path: Path) -> None:
    harness = Harness(settings, tmp_path)
    run(harness.setup)
    try:

        @hypothesis_settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            print_blob=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        )
        # Messages of different kinds in one example (hypothesis likes to repeat a value).
        @given(
            case=st.lists(
                messages(harness.org, harness.org_id), min_size=1, max_size=4, unique_by=lambda m: m.kind.split(" ")[0]
            ),
            alone=st.booleans(),
        )
        def check_example(case: list[Fuzzed], alone: bool) -> None:
            harness.example(case, alone)

        for case in known_cases(harness.org):
            for alone in (False, True):
                check_example = example(case=case, alone=alone)(check_example)
        check_example()
        print("fuzz:", dict(harness.seen.most_common()))
        assert harness.process is not None
        harness.check_process(harness.process, first=True)
    finally:
        run(harness.teardown)
