"""The consumer as real `tally consume` processes against the real RabbitMQ and PostgreSQL:
several competing processes on hot customers, SIGKILL mid-stream and restart, SIGTERM
drain, health endpoints; and the fold itself from concurrent connections.

Every test ends with each customer's aggregates exactly equal to the sums computed
independently from the events published: nothing lost, nothing counted twice."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from pydantic import ValidationError

from service.domain.events import Event, validate_event
from service.infra.settings import Settings
from service.store.fold import fold
from tests.eventkit import (
    Broker,
    actual,
    applied,
    assert_totals,
    distinct,
    expected,
    hot_and_cold,
    in_messages,
    make_events,
    publish_all,
    usage,
    wait_until,
)
from tests.factories import Org
from tests.processes import Fleet, TallyProcess, terminate_all, wait_applied, wait_drained

RETENTION = timedelta(days=35)


# ---- what the processes report -------------------------------------------------------------


async def metric_counts(http: aiohttp.ClientSession, p: TallyProcess) -> dict[str, float]:
    """tally_events_total by outcome, summed over event types, from the process's /metrics."""
    async with http.get(p.url + "/metrics") as r:
        assert r.status == 200, p.tail()
        text = await r.text()
    out: dict[str, float] = {}
    for m in re.finditer(r"^tally_events_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        outcome = re.search(r'outcome="([^"]*)"', m.group(1))
        if outcome:
            out[outcome.group(1)] = out.get(outcome.group(1), 0) + float(m.group(2))
    return out


def _hot_traffic_with_duplicates(
    rng: random.Random, orgs: list[Org], n: int, *, single_share: float, batch: int
) -> tuple[list[dict], list[dict | list[dict]], int]:
    """``n`` events over five hot and sixty cold customers per organization, in single-event
    and batch messages, plus a tenth of them again as new messages (duplicates to absorb),
    shuffled: the events, the messages and how many events were sent again."""
    subjects, weights = hot_and_cold(orgs, hot=5, cold=60)
    events = make_events(rng, subjects, weights, n)
    messages = in_messages(rng, events, single_share=single_share, batch=batch)
    again = rng.sample(events, n // 10)
    messages += in_messages(rng, again, single_share=0.5, batch=batch)
    rng.shuffle(messages)
    return events, messages, len(again)


# ---- 1. competing processes on hot customers ------------------------------------------


async def test_three_processes_on_hot_customers_fold_exactly_once(
    settings, pool, broker, fleet: Fleet, http, org: Org, other_org: Org
) -> None:
    rng = random.Random(1)
    orgs = [org, other_org]
    events, messages, again = _hot_traffic_with_duplicates(rng, orgs, 6000, single_share=0.4, batch=50)

    # A small prefetch spreads the stream over all three, and small batches (10 events, or
    # one batch message) make many short transactions whose row locks overlap: with these
    # settings a fold that locked customers in no fixed order deadlocked here run after run.
    procs = [fleet.start(f"consumer{i}", tally_prefetch="50", tally_batch_size="10") for i in range(3)]
    for p in procs:
        await p.wait_ready(http)
    await wait_until(lambda: _consumers(broker, 3), what="3 consumers on the queue")

    await publish_all(broker, messages)
    await wait_applied(pool, orgs, distinct(events), fleet)
    await wait_drained(broker, fleet)
    assert_totals(expected(events), await actual(pool, [o.name for o in orgs]))
    assert await applied(pool, orgs) == distinct(events)

    # Each process took part, and the outcomes add up: every event applied exactly once
    # over the fleet, every republished copy seen as a duplicate.
    counts = [await metric_counts(http, p) for p in procs]
    assert all(c.get("applied", 0) > 0 for c in counts), counts
    assert sum(c.get("applied", 0) for c in counts) == distinct(events), counts
    assert sum(c.get("duplicate", 0) for c in counts) == again, counts

    await terminate_all(fleet, procs)
    for p in procs:
        p.assert_no_errors()
    assert await broker.queue_depth(broker.names.dead) == 0


async def _consumers(broker: Broker, n: int) -> bool:
    return await broker.consumer_count(broker.names.ingest) == n


# ---- 2. SIGKILL mid-stream, twice --------------------------------------------------------


async def test_sigkill_mid_stream_and_restart_loses_nothing(
    settings, pool, broker, fleet: Fleet, http, org: Org
) -> None:
    rng = random.Random(2)
    subjects, weights = hot_and_cold([org], hot=5, cold=200)
    events = make_events(rng, subjects, weights, 20_000)
    messages: list[list[dict]] = []
    i = 0
    while i < len(events):
        size = rng.randint(1, 40)
        messages.append(events[i : i + size])
        i += size
    total = len(events)
    # Batches of at most 400 events, so the stream is dozens of transactions to kill amid.
    env = {"tally_batch_size": "400", "tally_prefetch": "200"}

    first = fleet.start("first", **env)
    await first.wait_ready(http)
    publishing = asyncio.create_task(publish_all(broker, messages))
    try:
        await wait_applied(pool, [org], total // 3, fleet)
        first.kill()
        assert first.proc.returncode == -signal.SIGKILL
        at_first_kill = await applied(pool, [org])

        second = fleet.start("second", **env)
        await second.wait_ready(http)
        await wait_applied(pool, [org], 2 * total // 3, fleet)
        second.kill()
        assert second.proc.returncode == -signal.SIGKILL
        at_second_kill = await applied(pool, [org])
        await publishing
    finally:
        if not publishing.done():
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
    # Both kills really happened mid-stream.
    assert at_first_kill < total and at_second_kill < total, (at_first_kill, at_second_kill, total)

    third = fleet.start("third", **env)
    await third.wait_ready(http)
    await wait_applied(pool, [org], total, fleet)
    await wait_drained(broker, fleet)
    assert_totals(expected(events), await actual(pool, [org.name]))
    assert await applied(pool, [org]) == total
    assert await third.terminate() == 0, third.tail()
    for p in (first, second, third):
        p.assert_no_errors()
    assert await broker.queue_depth(broker.names.ingest) == 0
    assert await broker.queue_depth(broker.names.dead) == 0


# ---- 3. SIGTERM drains --------------------------------------------------------------------


async def test_sigterm_drains_the_batch_in_hand_and_exits_zero(
    settings, pool, broker, fleet: Fleet, http, org: Org
) -> None:
    rng = random.Random(3)
    per_message = 5
    subjects, weights = hot_and_cold([org], hot=5, cold=50)
    events = make_events(rng, subjects, weights, 8000)
    messages = [events[i : i + per_message] for i in range(0, len(events), per_message)]
    total = len(events)
    await publish_all(broker, messages)
    env = {"tally_batch_size": "20", "tally_prefetch": "50"}

    draining = fleet.start("draining", **env)
    await draining.wait_ready(http)
    await wait_applied(pool, [org], total // 5, fleet)
    rc = await draining.terminate(timeout=30)
    assert rc == 0, f"exit code {rc} after SIGTERM\n{draining.tail()}"
    draining.assert_no_errors()  # "did not drain in time" would be an error line

    # The drain committed and acked exactly what it folded: once the broker has let go of
    # the process (its unacked messages are back in the queue), every message is either
    # applied and gone, or unapplied and ready again. A batch committed but left unacked
    # would be counted twice here, one acked but not committed would be missing.
    await wait_until(lambda: _consumers(broker, 0), timeout=10, what="the drained consumer gone from the queue")

    async def accounted() -> bool:
        depth = await broker.queue_depth(broker.names.ingest)
        return depth * per_message + await applied(pool, [org]) >= total

    await wait_until(accounted, timeout=10, what="queue depth + applied == published")
    depth, stopped_at = await broker.queue_depth(broker.names.ingest), await applied(pool, [org])
    assert depth * per_message + stopped_at == total, (depth, stopped_at, total, draining.tail())
    assert 0 < stopped_at < total, (stopped_at, total)  # the SIGTERM came mid-stream

    fresh = fleet.start("fresh", **env)
    await fresh.wait_ready(http)
    await wait_applied(pool, [org], total, fleet)
    await wait_drained(broker, fleet)
    assert_totals(expected(events), await actual(pool, [org.name]))
    assert await applied(pool, [org]) == total
    assert await fresh.terminate() == 0, fresh.tail()
    for p in (draining, fresh):
        p.assert_no_errors()
    assert await broker.queue_depth(broker.names.dead) == 0


# ---- 4. health endpoints -------------------------------------------------------------------


async def test_consumer_process_health_and_readiness(settings, pool, broker, fleet: Fleet, http, org: Org) -> None:
    p = fleet.start("health")

    async def healthy() -> bool:
        p.check_alive()
        try:
            async with http.get(p.url + "/healthz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(healthy, timeout=30, what="/healthz 200")
    await p.wait_ready(http)
    async with http.get(p.url + "/readyz") as r:
        assert r.status == 200
        body = await r.json()
    assert body["status"] == "ok" and body["checks"].get("consumer") == "ok", body
    assert set(body["checks"].values()) == {"ok"} and "database" in body["checks"], body
    assert await broker.consumer_count(broker.names.ingest) == 1
    async with http.get(p.url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    assert "tally_broker_connected 1.0" in text

    # Ready means consuming: an event published now is applied.
    event = usage(org.name, "probe")
    await broker.publish(event)
    await wait_applied(pool, [org], 1, fleet)
    assert_totals(expected([event]), await actual(pool, [org.name]))
    assert await p.terminate() == 0, p.tail()
    p.assert_no_errors()


# ---- 5. the fold from concurrent connections ----------------------------------------------


async def test_concurrent_folds_on_hot_customers_never_deadlock(pool, org: Org, other_org: Org) -> None:
    rng = random.Random(5)
    orgs = [org, other_org]
    subjects, weights = hot_and_cold(orgs, hot=5, cold=40)
    raws = make_events(rng, subjects, weights, 4000)
    # Cut into batches of varied sizes; some events go into a second, different batch too.
    batches: list[list[dict]] = []
    i = 0
    while i < len(raws):
        size = rng.randint(20, 200)
        batches.append(raws[i : i + size])
        i += size
    duplicated = 0
    for e in rng.sample(raws, 600):
        home = next(b for b in batches if any(x is e for x in b))
        other = rng.choice([b for b in batches if b is not home])
        other.insert(rng.randrange(len(other) + 1), e)
        duplicated += 1
    for b in batches:
        rng.shuffle(b)
    rng.shuffle(batches)

    # Validated up front, so the workers spend their time in the database, side by side.
    now = datetime.now(UTC)
    work: asyncio.Queue[list[Event]] = asyncio.Queue()
    for b in batches:
        work.put_nowait([validate_event(raw, now) for raw in b])
    outcomes: list[str] = []

    async def worker() -> None:
        async with pool.acquire() as conn:
            while not work.empty():
                result = await fold(conn, work.get_nowait(), retention=RETENTION)
                outcomes.extend(o.status for o in result.outcomes)

    workers = 4
    assert pool.get_max_size() >= workers
    results = await asyncio.gather(*(worker() for _ in range(workers)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors  # no DeadlockDetectedError, nor anything else

    assert len(outcomes) == len(raws) + duplicated
    assert outcomes.count("applied") == len(raws)
    assert outcomes.count("duplicate") == duplicated
    assert outcomes.count("rejected") == 0
    assert_totals(expected(raws), await actual(pool, [o.name for o in orgs]))
    assert await applied(pool, orgs) == len(raws)


# ---- 6. one `tally consume` of several processes -------------------------------------------


def _gone(pid: int) -> bool:
    """The process has exited (a zombie left for its new parent to reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


async def test_one_consume_of_three_processes_folds_exactly_once_and_its_metrics_add_up_every_process(
    settings, pool, broker, fleet: Fleet, http, org: Org, other_org: Org
) -> None:
    rng = random.Random(6)
    orgs = [org, other_org]
    events, messages, again = _hot_traffic_with_duplicates(rng, orgs, 4000, single_share=0.6, batch=20)

    # A small prefetch spreads the stream over the three processes.
    p = fleet.start("consume", tally_consumer_processes="3", tally_prefetch="20", tally_batch_size="10")
    await p.wait_ready(http)
    await wait_until(lambda: _consumers(broker, 3), what="the 3 processes of one consume on the queue")
    pids = p.worker_pids()
    assert len(pids) == 3 and p.proc.pid not in pids, pids

    await publish_all(broker, messages)
    await wait_applied(pool, orgs, distinct(events), fleet)
    await wait_drained(broker, fleet)
    assert_totals(expected(events), await actual(pool, [o.name for o in orgs]))
    assert await applied(pool, orgs) == distinct(events)

    # The one /metrics counts what every process folded: the first process alone folds about
    # a third of the stream.
    counts = await metric_counts(http, p)
    assert counts.get("applied") == distinct(events), counts
    assert counts.get("duplicate") == again, counts
    async with http.get(p.url + "/metrics") as r:
        text = await r.text()
    assert "tally_broker_connected 1.0" in text, text

    assert await p.terminate() == 0, p.tail()
    assert all(_gone(pid) for pid in pids), p.tail()
    p.assert_no_errors()
    assert await broker.queue_depth(broker.names.dead) == 0


async def test_when_one_of_its_processes_dies_consume_stops_the_others_and_exits_for_a_restart(
    settings, pool, broker, fleet: Fleet, http, org: Org
) -> None:
    rng = random.Random(7)
    subjects, weights = hot_and_cold([org], hot=5, cold=200)
    events = make_events(rng, subjects, weights, 20_000)
    messages = [events[i : i + 10] for i in range(0, len(events), 10)]
    total = len(events)
    env = {"tally_consumer_processes": "2", "tally_batch_size": "400", "tally_prefetch": "200"}

    first = fleet.start("first", **env)
    await first.wait_ready(http)
    await wait_until(lambda: _consumers(broker, 2), what="both processes on the queue")
    serving, folding = first.worker_pids()
    publishing = asyncio.create_task(publish_all(broker, messages))
    try:
        await wait_applied(pool, [org], total // 3, fleet)
        os.kill(folding, signal.SIGKILL)
        # The supervisor stops the other process (it drains) and exits 70, as a single
        # process whose fold crashed does: its supervisor restarts the whole.
        await wait_until(first._exited, timeout=30, what="consume exits after one of its processes died")
        assert first.proc.returncode == 70, first.tail()
        assert _gone(serving) and _gone(folding)
        stopped_at = await applied(pool, [org])

        second = fleet.start("second", **env)
        await second.wait_ready(http)
        await publishing
    finally:
        if not publishing.done():
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
    assert stopped_at < total, (stopped_at, total)  # the kill came mid-stream
    await wait_applied(pool, [org], total, fleet)
    await wait_drained(broker, fleet)
    assert_totals(expected(events), await actual(pool, [org.name]))
    assert await applied(pool, [org]) == total
    assert await second.terminate() == 0, second.tail()
    critical = [e for e in first.log_entries() if e.get("level") == "critical"]
    assert [e["message"] for e in critical] == ["a consumer process ended; stopping the others"], first.tail()
    assert critical[0]["exitcode"] == -signal.SIGKILL
    second.assert_no_errors()
    assert await broker.queue_depth(broker.names.dead) == 0


async def test_sigkill_of_consume_takes_its_processes_with_it(
    settings, pool, broker, fleet: Fleet, http, org: Org
) -> None:
    p = fleet.start("killed", tally_consumer_processes="2")
    await p.wait_ready(http)
    await wait_until(lambda: _consumers(broker, 2), what="both processes on the queue")
    pids = p.worker_pids()
    p.kill()

    async def all_gone() -> bool:
        return all(_gone(pid) for pid in pids)

    await wait_until(all_gone, timeout=10, what="no process of the killed consume left")
    await wait_until(lambda: _consumers(broker, 0), timeout=10, what="no consumer left on the queue")


def test_consume_folds_with_one_process_per_core_at_most_four_unless_told(monkeypatch) -> None:
    monkeypatch.delenv("TALLY_CONSUMER_PROCESSES", raising=False)
    for cores, processes in ((1, 1), (2, 2), (3, 3), (8, 4), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert Settings().consumer_process_count == processes, cores
    monkeypatch.setenv("TALLY_CONSUMER_PROCESSES", "3")
    assert Settings().consumer_process_count == 3
    monkeypatch.setenv("TALLY_CONSUMER_PROCESSES", "0")
    with pytest.raises(ValidationError, match="consumer_processes"):
        Settings()
