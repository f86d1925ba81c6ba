"""No input makes a consumer exit: poison that once crash-looped the fleet, and the safety
net for inputs that bring out a bug (dead-lettered alone with an internal-error reason,
logged as a bug, never an exit). Metric labels stay in closed sets whatever the input."""

from __future__ import annotations

import logging
import re
import uuid

import aiohttp
import asyncpg
import orjson
import pytest

import consumers.batch as batch_module
import consumers.ingest as consumer_module
from service.infra import metrics
from service.infra.broker import ATTEMPT_HEADER, REASON_HEADER, ROUTING_KEY_HEADER
from service.infra.settings import Settings
from tests.consumerkit import running_consumer
from tests.eventkit import Broker, actual, assert_totals, expected, usage, wait_until
from tests.factories import Org
from tests.processes import Fleet, TallyProcess, wait_applied


async def dead_letters_while_alive(
    broker: Broker, n: int, process: TallyProcess | None = None, timeout: float = 30.0
) -> list:
    """Take ``n`` dead letters, failing at once if the consumer process dies meanwhile."""
    assert broker.channel is not None
    queue = await broker.channel.declare_queue(broker.names.dead, passive=True)
    out: list = []

    async def taken() -> bool:
        if process is not None:
            process.check_alive()
        while len(out) < n and (message := await queue.get(no_ack=True, fail=False)) is not None:
            out.append(message)
        return len(out) >= n

    await wait_until(taken, timeout=timeout, what=f"{n} dead letter(s)")
    return out


async def metrics_text(http: aiohttp.ClientSession, process: TallyProcess) -> str:
    async with http.get(process.url + "/metrics") as r:
        assert r.status == 200, process.tail()
        return await r.text()


def label_values(text: str, name: str, label: str) -> set[str]:
    return {m.group(1) for m in re.finditer(rf'^{name}\{{[^}}]*{label}="([^"]*)"', text, re.MULTILINE)}


# ---- the dead-letter routing key once came from the event's own type ----------------------


async def test_an_event_type_too_long_for_a_routing_key_is_dead_lettered_alone(
    pool, broker: Broker, fleet: Fleet, http, org: Org
) -> None:
    """A 300-byte `type` inside a batch message: the consumer took the dead letter's
    routing key from it (`ValueError: Routing key too long`), exited 70, and crash-looped
    every consumer until the broker's delivery limit. The routing key of a dead letter is
    the message's; the event dies alone, with a reason, after one delivery."""
    p = fleet.start("poison")
    await p.wait_ready(http)
    good = [usage(org.name, f"around{i}") for i in range(4)]
    long_type = {**usage(org.name, "long_type"), "type": "usage." + "x" * 294}
    assert len(long_type["type"].encode()) == 300
    await broker.publish([good[0], good[1], long_type, good[2], good[3]])
    # Every invalid `type` used to become a new metric series: three more.
    bogus = [{**usage(org.name, "bogus"), "type": f"bogus.{uuid.uuid4().hex}"} for _ in range(3)]
    for event in bogus:
        await broker.publish(event)
    after = usage(org.name, "after")
    await broker.publish(after)

    letters = await dead_letters_while_alive(broker, 4, p)
    await wait_applied(pool, [org], 5, fleet)
    by_type = {orjson.loads(m.body)["type"]: m for m in letters}
    assert set(by_type) == {long_type["type"], *(e["type"] for e in bogus)}
    letter = by_type[long_type["type"]]
    assert orjson.loads(letter.body) == long_type
    assert str(letter.headers[REASON_HEADER]).startswith("invalid field type")
    for m in letters:
        assert m.routing_key == "usage.recorded" and m.headers[ROUTING_KEY_HEADER] == "usage.recorded"
        assert m.headers[ATTEMPT_HEADER] == 1  # refused on its first delivery
    assert_totals(expected([*good, after]), await actual(pool, [org.name]))

    text = await metrics_text(http, p)
    assert label_values(text, "tally_events_total", "type") <= {*metrics.EVENT_TYPE_LABELS, metrics.OTHER_TYPE}
    assert "xxxx" not in text and "bogus." not in text
    assert re.search(r'^tally_events_total\{[^}]*type="other"[^}]*\} 4\.0$', text, re.MULTILINE), text
    assert label_values(text, "tally_dead_letters_total", "reason") <= set(metrics.DEAD_LETTER_REASONS)
    p.check_alive()
    assert await p.terminate() == 0, p.tail()
    p.assert_no_errors()


async def test_events_nested_past_the_encoders_depth_are_dead_lettered_alone(
    pool, broker: Broker, fleet: Fleet, http, org: Org
) -> None:
    """Dead-lettering one event of a batch re-encodes it; orjson stops at 255 levels while
    the decoder takes 1,024, so an event nested 300 or 1,000 deep crashed the consumer while
    it dead-lettered it."""
    p = fleet.start("deep")
    await p.wait_ready(http)
    good = [usage(org.name, f"deep_around{i}") for i in range(3)]
    deep: list[bytes] = []
    for depth in (300, 1000):
        event = {**usage(org.name, f"deep{depth}"), "type": "customer.upserted", "data": {"metadata": "HOLE"}}
        deep.append(orjson.dumps(event).replace(b'"HOLE"', b'{"a":' * depth + b"1" + b"}" * depth))
    body = (
        b"[" + b",".join([orjson.dumps(good[0]), deep[0], orjson.dumps(good[1]), deep[1], orjson.dumps(good[2])]) + b"]"
    )
    await broker.publish(body)
    letters = await dead_letters_while_alive(broker, 2, p)
    await wait_applied(pool, [org], 3, fleet)
    assert sorted(m.body for m in letters) == sorted(deep)  # each event as sent, alone
    reasons = [str(m.headers[REASON_HEADER]) for m in letters]
    assert not [r for r in reasons if r.startswith("internal error")], reasons
    assert_totals(expected(good), await actual(pool, [org.name]))
    p.check_alive()
    assert await p.terminate() == 0, p.tail()
    assert not [e for e in p.log_entries() if e.get("level") == "critical"], p.tail()


# ---- the safety net: a bug brought out by one input never makes the consumer exit ---------
#
# No real input should reach these paths (that would be a validation bug, and the fuzz test
# hunts for those): the tests put a fault into the code path itself, for one marked event,
# against the real broker and database.


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def _still_consuming(consumer, pool, broker: Broker, org: Org) -> None:
    marker = usage(org.name, f"still_{uuid.uuid4().hex[:8]}")
    await broker.publish(marker)
    await wait_until(lambda: _applied(pool, org, marker["subject"]), what="a later event applied")
    assert consumer.connected.is_set()


async def _applied(pool, org: Org, subject: str) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT count(*) FROM customers WHERE organization_id = $1 AND customer_identifier = $2", org.id, subject
        )
    )


@pytest.mark.parametrize("stage", ["decoding", "validating", "folding", "folding-client-error"])
async def test_a_bug_one_input_brings_out_dead_letters_it_alone(
    settings: Settings,
    pool,
    broker: Broker,
    org: Org,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stage: str,
) -> None:
    marked = {**usage(org.name, "explodes"), "data": {"requests": 1, "marker": "explodes"}}
    good = [usage(org.name, f"safe{i}") for i in range(5)]

    def is_marked(value: object) -> bool:
        return isinstance(value, dict) and value.get("subject") == "explodes"

    if stage == "decoding":
        real_decode = batch_module.decode_body

        def decode_body(body: bytes) -> list[object]:
            if b'"marker":"explodes"' in body:
                raise RecursionError("simulated bug in decoding")
            return real_decode(body)

        monkeypatch.setattr(batch_module, "decode_body", decode_body)
    elif stage == "validating":
        real_validate = batch_module.validate_event

        def validate_event(raw, now):
            if is_marked(raw):
                raise RecursionError("simulated bug in validation")
            return real_validate(raw, now)

        monkeypatch.setattr(batch_module, "validate_event", validate_event)
    else:
        real_fold = consumer_module.fold

        async def fold(conn, events, **kwargs):
            if any(e.subject == "explodes" for e in events):
                if stage == "folding-client-error":  # a statement built wrong: retrying never helps
                    raise asyncpg.InterfaceError("the server expects 13 arguments for this query, 0 were passed")
                raise KeyError("simulated bug in the fold")  # as a race in the fold once raised
            return await real_fold(conn, events, **kwargs)

        monkeypatch.setattr(consumer_module, "fold", fold)

    dead_before = _sample("tally_dead_letters_total", reason="internal_error")
    caplog.set_level(logging.ERROR, logger="tally.consumer")
    async with running_consumer(settings, pool, broker) as consumer:
        if stage == "decoding":  # a message-level fault takes the message, not its neighbours
            await broker.publish(good[:3])
            await broker.publish(marked)
            await broker.publish(good[3:])
        else:
            await broker.publish([good[0], good[1], marked, good[2], good[3]])
            await broker.publish(good[4])
        [letter] = await dead_letters_while_alive(broker, 1)
        await _still_consuming(consumer, pool, broker, org)
    want = expected(good)
    got = await actual(pool, [org.name])
    assert_totals(want, {k: v for k, v in got.items() if k in want})
    assert orjson.loads(letter.body) == marked
    doing, exception = {
        "decoding": ("decoding the message", "RecursionError"),
        "validating": ("validating the event", "RecursionError"),
        "folding": ("folding the event", "KeyError"),
        "folding-client-error": ("folding the event", "InterfaceError"),
    }[stage]
    assert letter.headers[REASON_HEADER] == f"internal error while {doing}: {exception}"
    assert letter.headers[ROUTING_KEY_HEADER] == "usage.recorded" and letter.headers[ATTEMPT_HEADER] == 1
    assert _sample("tally_dead_letters_total", reason="internal_error") - dead_before == 1
    bugs = [r for r in caplog.records if r.name == "tally.consumer" and r.levelno == logging.ERROR]
    assert len(bugs) == 1 and bugs[0].exc_info and "bug" in bugs[0].getMessage(), bugs
