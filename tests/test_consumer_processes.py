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
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from service.core.events import Event, validate_event
from service.core.fold import fold
from service.infra.settings import Settings
from tests.conftest import Org
from tests.eventkit import Broker, actual, assert_totals, expected, usage, wait_until

ROOT = Path(__file__).resolve().parent.parent
RETENTION = timedelta(days=35)


# ---- processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConsumerProcess:
    """One `tally consume` subprocess; its stderr (and stdout) go to a log file."""

    def __init__(self, name: str, settings: Settings, broker: Broker, log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "consume"],
            cwd=ROOT,
            env={
                **os.environ,
                "TALLY_DATABASE_URL": settings.database_url,
                "TALLY_AMQP_NAMESPACE": broker.names.namespace,
                "TALLY_CONSUMER_HTTP_PORT": str(self.port),
                "TALLY_HTTP_HOST": "127.0.0.1",
                "TALLY_BATCH_MAX_WAIT": "0.02",
                "TALLY_LOG_FORMAT": "json",
                **env,
            },
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return f"--- {self.name} (pid {self.proc.pid}, rc {self.proc.poll()}) log tail ---\n" + "\n".join(
            self.log_text().splitlines()[-lines:]
        )

    def log_entries(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = {"level": "raw", "message": line}
            out.append(entry if isinstance(entry, dict) else {"level": "raw", "message": line})
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        assert self.alive(), f"consumer {self.name} exited unexpectedly\n{self.tail()}"

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        async def ready() -> bool:
            self.check_alive()
            try:
                async with session.get(self.url + "/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        try:
            await wait_until(ready, timeout=timeout, what=f"{self.name} /readyz 200")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait (bounded) for the exit; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            await wait_until(self._exited, timeout=timeout, interval=0.05, what=f"{self.name} exit after SIGTERM")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no drain, no ack, no clean disconnect."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    async def _exited(self) -> bool:
        return self.proc.poll() is not None

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()

    def deadlock_lines(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if "deadlock" in line.lower()]

    def assert_no_errors(self) -> None:
        """No error or critical log line, and no deadlock mentioned anywhere."""
        bad = [e for e in self.log_entries() if e.get("level") in ("error", "critical")]
        assert not bad, f"{self.name} logged errors: {bad}\n{self.tail()}"
        assert not self.deadlock_lines(), f"{self.name} hit a deadlock\n" + "\n".join(self.deadlock_lines())


class Fleet:
    """Consumer processes started by one test; every one is killed at teardown."""

    def __init__(self, settings: Settings, broker: Broker, log_dir: Path) -> None:
        self.settings, self.broker, self.log_dir = settings, broker, log_dir
        self.processes: list[ConsumerProcess] = []

    def start(self, name: str, **env: str) -> ConsumerProcess:
        p = ConsumerProcess(name, self.settings, self.broker, self.log_dir, {k.upper(): v for k, v in env.items()})
        self.processes.append(p)
        return p

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def close(self) -> None:
        for p in self.processes:
            p.close()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with Broker() as b:
        yield b


@pytest.fixture
def fleet(migrated: str, settings: Settings, broker: Broker, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(settings, broker, tmp_path)
    try:
        yield f
    finally:
        f.close()  # before the broker fixture deletes the namespace


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


# ---- events and database ---------------------------------------------------------------


def recent(rng: random.Random, days: float = 20) -> datetime:
    """A time within the last ``days`` (never in the future, well inside the dedupe window)."""
    return datetime.now(timezone.utc) - timedelta(seconds=rng.uniform(60, days * 86_400))


def make_events(rng: random.Random, subjects: list[tuple[str, str]], weights: list[float], n: int) -> list[dict]:
    """``n`` usage events over (organization, subject) pairs, one request each."""
    out = []
    for org, subject in rng.choices(subjects, weights, k=n):
        out.append(usage(
            org, subject, when=recent(rng), prompt=rng.randint(0, 500), completion=rng.randint(0, 500),
            cost=f"{rng.randint(0, 10**6) / 10**6:.6f}", latency=rng.choice([None, round(rng.uniform(0, 5), 3)]),
            ttft=rng.choice([None, round(rng.uniform(0, 1), 3)]),
        ))  # fmt: skip
    return out


def hot_and_cold(orgs: list[Org], hot: int, cold: int) -> tuple[list[tuple[str, str]], list[float]]:
    """``hot`` customers that get ~85% of the traffic, ``cold`` that share the rest."""
    hot_subjects = [(orgs[i % len(orgs)].name, f"hot{i}") for i in range(hot)]
    cold_subjects = [(orgs[i % len(orgs)].name, f"cold{i}") for i in range(cold)]
    return hot_subjects + cold_subjects, [0.85 / hot] * hot + [0.15 / cold] * cold


def in_messages(rng: random.Random, events: list[dict], single_share: float, batch: int) -> list[dict | list[dict]]:
    """Split events into single-event messages (about ``single_share`` of them) and batch
    messages of ``batch`` events."""
    singles = [e for e in events if rng.random() < single_share]
    single_ids = {id(e) for e in singles}
    rest = [e for e in events if id(e) not in single_ids]
    return [*singles, *(rest[i : i + batch] for i in range(0, len(rest), batch))]


async def publish_all(broker: Broker, messages: list, concurrency: int = 64) -> None:
    """Publish every message with confirms, several in flight at once."""
    gate = asyncio.Semaphore(concurrency)

    async def one(message: object) -> None:
        async with gate:
            await broker.publish(message)  # type: ignore[arg-type]

    await asyncio.gather(*(one(m) for m in messages))


async def applied(pool: asyncpg.Pool, orgs: list[Org]) -> int:
    """Events applied so far for these organizations (their dedupe keys)."""
    return await pool.fetchval(
        "SELECT count(*) FROM processed_events WHERE organization_id = ANY($1::uuid[])", [o.id for o in orgs]
    )


def distinct(events: list[dict]) -> int:
    return len({(e["organization"], e["source"], e["id"]) for e in events})


async def wait_applied(pool: asyncpg.Pool, orgs: list[Org], n: int, fleet: Fleet, timeout: float = 60.0) -> None:
    async def done() -> bool:
        for p in fleet.processes:
            if p.proc.returncode is None and p.proc.poll() is not None:
                raise AssertionError(f"consumer {p.name} died\n{p.tail()}")
        return await applied(pool, orgs) >= n

    try:
        await wait_until(done, timeout=timeout, what=f"{n} events applied")
    except AssertionError as exc:
        raise AssertionError(f"{exc} (applied {await applied(pool, orgs)})\n{fleet.tails()}") from None


async def wait_drained(broker: Broker, fleet: Fleet, timeout: float = 30.0) -> None:
    async def empty() -> bool:
        return await broker.queue_depth(broker.names.ingest) == 0

    try:
        await wait_until(empty, timeout=timeout, what="ingest queue empty")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{fleet.tails()}") from None


async def metric_counts(http: aiohttp.ClientSession, p: ConsumerProcess) -> dict[str, float]:
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


async def terminate_all(fleet: Fleet, processes: list[ConsumerProcess], timeout: float = 30.0) -> None:
    for p in processes:
        p.proc.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            await wait_until(p._exited, timeout=timeout, what=f"{p.name} exit after SIGTERM")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{fleet.tails()}") from None
        assert p.proc.returncode == 0, f"{p.name} exited {p.proc.returncode} on SIGTERM\n{p.tail()}"


# ---- 1. competing processes on hot customers ------------------------------------------


async def test_three_processes_on_hot_customers_fold_exactly_once(
    settings, pool, broker, fleet: Fleet, http, org: Org, other_org: Org
) -> None:
    rng = random.Random(1)
    orgs = [org, other_org]
    subjects, weights = hot_and_cold(orgs, hot=5, cold=60)
    events = make_events(rng, subjects, weights, 6000)
    messages = in_messages(rng, events, single_share=0.4, batch=50)
    # Some events again, as new messages (singles and batches): duplicates to absorb.
    again = rng.sample(events, 600)
    messages += in_messages(rng, again, single_share=0.5, batch=50)
    rng.shuffle(messages)

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
    assert sum(c.get("duplicate", 0) for c in counts) == len(again), counts

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
    now = datetime.now(timezone.utc)
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
