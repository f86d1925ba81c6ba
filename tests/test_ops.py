"""Operating tally: metrics, queue statistics, dead-letter tools, readiness, logs, and the
deployment files — against the real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import sys
import uuid

import aio_pika
import aiohttp
import asyncpg
import orjson
import pytest
import yaml

from consumers.deadletters import DeadLetters
from service.api import appkeys
from service.cli import build_parser
from service.infra import metrics
from service.infra.broker import event_message
from service.infra.errors import Unavailable
from service.infra.publisher import Publisher
from service.infra.queues import management_problem, queue_stats
from service.store import auth
from tests.consumerkit import barrier, running_consumer
from tests.eventkit import AMQP_URL, Broker, actual, assert_totals, expected, usage, wait_until
from tests.factories import Org
from tests.processes import ROOT
from tests.support import RABBITMQCTL, rabbitmqctl, rabbitmqctl_problem

MANAGEMENT_URL = os.environ.get("TALLY_AMQP_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672/")
NO_MANAGEMENT = "http://guest:guest@127.0.0.1:1/"  # nothing listens on port 1
# The management plugin is optional for tally (the README's quick start needs only RabbitMQ):
# a test of what it adds skips where it is off. CI enables it and sets TALLY_REQUIRE_MANAGEMENT,
# so there the test can never be skipped.
REQUIRE_MANAGEMENT = bool(os.environ.get("TALLY_REQUIRE_MANAGEMENT"))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if sample == name and found == want:
            return float(value)
    return 0.0


async def test_http_metrics_move_with_requests(client, org: Org) -> None:
    before = await (await client.get("/metrics")).text()
    for _ in range(3):
        assert (await client.get("/v1/customers", headers=org.headers())).status == 200
    assert (await client.get("/v1/customers?limit=0", headers=org.headers())).status == 400
    after = await (await client.get("/metrics")).text()
    labels = {"route": "/v1/customers", "method": "GET"}
    assert (
        metric(after, "tally_http_requests_total", **labels, status="200")
        - metric(before, "tally_http_requests_total", **labels, status="200")
        == 3
    )
    assert (
        metric(after, "tally_http_requests_total", **labels, status="400")
        - metric(before, "tally_http_requests_total", **labels, status="400")
        == 1
    )
    assert metric(after, "tally_http_request_duration_seconds_count", **labels) >= 4
    assert "tally_db_pool_in_use" in after


async def test_consumer_metrics_move_as_events_flow(settings, pool, broker: Broker, org: Org) -> None:
    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    applied = sample("tally_events_total", type="usage.recorded", outcome="applied")
    duplicate = sample("tally_events_total", type="usage.recorded", outcome="duplicate")
    dead = sample("tally_dead_letters_total", reason="unknown_organization")
    lag = sample("tally_event_lag_seconds_count")
    events = [usage(org.name, "metered") for _ in range(5)]
    async with running_consumer(settings, pool, broker):
        await broker.publish(events)
        await broker.publish(events[0])
        await broker.publish(usage("nobody-knows-this-org", "x"))
        await barrier(pool, broker, org)
        assert sample("tally_broker_connected") == 1
        assert sample("tally_queue_consumers", queue=broker.names.ingest) >= 1
    assert sample("tally_events_total", type="usage.recorded", outcome="applied") - applied == 6  # 5 + barrier
    assert sample("tally_events_total", type="usage.recorded", outcome="duplicate") - duplicate == 1
    assert sample("tally_dead_letters_total", reason="unknown_organization") - dead == 1
    assert sample("tally_event_lag_seconds_count") - lag == 6
    assert sample("tally_batch_events_count") > 0


async def test_a_dead_letter_is_logged_with_its_event_and_organization(
    settings, pool, broker: Broker, org: Org, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tally.consumer")
    stranger = f"nobody-{uuid.uuid4().hex[:8]}"
    orphan = usage(stranger, "x")
    async with running_consumer(settings, pool, broker):
        await broker.publish([usage(org.name, "fine"), orphan])  # from a batch: the one event dies
        await broker.publish(b"not json")  # a whole message: no event to name
        await barrier(pool, broker, org)
    lines = [r for r in caplog.records if r.getMessage() == "dead-lettered"]
    by_event = {getattr(r, "event_id", None): r for r in lines}
    logged = by_event[orphan["id"]]
    assert logged.organization == stranger and logged.reason_code == "unknown_organization", vars(logged)
    assert logged.routing_key == "usage.recorded"
    whole = by_event[None]
    assert whole.reason_code == "not_json" and whole.organization is None


@pytest.mark.parametrize("management", [MANAGEMENT_URL, NO_MANAGEMENT], ids=["management", "amqp-only"])
async def test_queue_stats_report_true_depths(broker: Broker, org: Org, management: str) -> None:
    if management == MANAGEMENT_URL:
        problem = await management_problem(MANAGEMENT_URL)
        assert problem is None or not REQUIRE_MANAGEMENT, f"TALLY_REQUIRE_MANAGEMENT is set but {problem}"
        if problem is not None:
            pytest.skip(f"needs the RabbitMQ management API ({problem}; .ci/run enables it)")
    for i in range(7):
        await broker.publish(usage(org.name, f"q{i}"))
    await broker.publish(b"not json")  # no consumer runs: nothing is dead-lettered yet

    async def seven_ready() -> bool:
        stats = {s.name: s for s in await queue_stats(AMQP_URL, management, broker.names)}
        return stats[broker.names.ingest].ready == 8 and stats[broker.names.dead].ready == 0

    # The management API refreshes its statistics every few seconds; AMQP is immediate.
    await wait_until(seven_ready, timeout=30, interval=0.5, what="queue statistics")
    stats = {s.name: s for s in await queue_stats(AMQP_URL, management, broker.names)}
    ingest = stats[broker.names.ingest]
    assert ingest.consumers == 0
    if management == NO_MANAGEMENT:
        assert ingest.source == "amqp" and ingest.unacknowledged is None and ingest.publish_rate is None
    else:
        assert ingest.source == "management" and ingest.unacknowledged == 0 and ingest.publish_rate is not None


async def test_tally_queues_cli_and_ops_route(pool, client, broker: Broker, org: Org) -> None:
    for i in range(3):
        await broker.publish(usage(org.name, f"cli{i}"))
    env = {**os.environ, "TALLY_AMQP_NAMESPACE": broker.names.namespace, "TALLY_AMQP_MANAGEMENT_URL": NO_MANAGEMENT}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "queues", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    by_name = {q["name"]: q for q in json.loads(result.stdout)}
    assert by_name[broker.names.ingest]["ready"] == 3 and by_name[broker.names.dead]["ready"] == 0

    async with pool.acquire() as conn:
        operator = await auth.create_key(conn, org.name, ("ops",))
        admin = await auth.create_key(conn, org.name, ("admin",))
    settings = client.app[appkeys.SETTINGS]
    saved = settings.amqp_namespace, settings.amqp_management_url
    settings.amqp_namespace, settings.amqp_management_url = broker.names.namespace, NO_MANAGEMENT
    try:
        r = await client.get("/v1/ops/queues", headers={"Authorization": f"Bearer {operator.key}"})
        assert r.status == 200
        queues = {q["name"]: q for q in (await r.json())["queues"]}
        assert queues[broker.names.ingest]["ready"] == 3
        r = await client.get("/v1/ops/queues", headers=org.headers())
        assert r.status == 403  # read/write keys are not operators
        r = await client.get("/v1/ops/queues", headers={"Authorization": f"Bearer {admin.key}"})
        assert r.status == 403  # nor is an organization's admin: queues carry every tenant's traffic
    finally:
        settings.amqp_namespace, settings.amqp_management_url = saved


async def test_dead_letters_list_replay_after_fix_and_purge(settings, pool, broker: Broker, org: Org) -> None:
    late_org = f"late-{uuid.uuid4().hex[:8]}"
    orphans = [usage(late_org, f"o{i % 2}", cost="0.25") for i in range(6)]
    async with running_consumer(settings, pool, broker):
        await broker.publish(orphans[:3])  # a batch message: each event dead-letters alone
        for e in orphans[3:]:
            await broker.publish(e)
        await broker.publish(b"{broken")
        await barrier(pool, broker, org)
    await wait_until(lambda: _depth(broker, broker.names.dead, 7), what="seven dead letters")

    async with DeadLetters(AMQP_URL, broker.names) as dlq:
        infos = await dlq.list()
    assert len(infos) == 7
    unknown = [i for i in infos if "unknown organization" in i.reason]
    assert len(unknown) == 6 and all(i.organization == late_org and i.event_type == "usage.recorded" for i in unknown)
    assert {i.event_id for i in unknown} == {e["id"] for e in orphans}
    assert all(i.first_death for i in infos)
    # Listing returns every message to the queue (the broker requeues them as the
    # tool's connection closes, asynchronously).
    await wait_until(lambda: _depth(broker, broker.names.dead, 7), what="listed messages back in the queue")

    # The cause is fixed: the organization now exists. Replay applies each event once.
    async with pool.acquire() as conn:
        await auth.create_organization(conn, late_org)
    async with DeadLetters(AMQP_URL, broker.names) as dlq:
        replayed, kept = await dlq.replay(reason="unknown organization")
    assert (replayed, kept) == (6, 1)
    async with running_consumer(settings, pool, broker):
        want = expected(orphans)

        async def applied() -> bool:
            got = await actual(pool, [late_org])
            return set(got) == set(want) and all(got[k].requests == want[k].requests for k in want)

        await wait_until(applied, what="replayed events applied")
        # Replaying the same events again (re-published by hand) changes nothing.
        for e in orphans:
            await broker.publish(e)
        await barrier(pool, broker, org)
    assert_totals(want, await actual(pool, [late_org]))

    async with DeadLetters(AMQP_URL, broker.names) as dlq:
        purged, kept = await dlq.purge(reason="not valid JSON")
    assert (purged, kept) == (1, 0)
    assert await broker.queue_depth(broker.names.dead) == 0


async def test_interrupted_dead_letter_session_loses_nothing(broker: Broker, org: Org) -> None:
    channel = broker.channel
    assert channel is not None
    dlx = await channel.get_exchange(broker.names.dlx)
    for i in range(4):
        await dlx.publish(
            aio_pika.Message(orjson.dumps(usage(org.name, f"d{i}")), headers={"x-tally-reason": "test"}),
            routing_key="usage.recorded",
        )
    await wait_until(lambda: _depth(broker, broker.names.dead, 4))
    with pytest.raises(RuntimeError):
        async with DeadLetters(AMQP_URL, broker.names) as dlq:
            async for _ in dlq.messages(limit=3):
                pass
            raise RuntimeError("operator pressed ^C")
    await wait_until(lambda: _depth(broker, broker.names.dead, 4), what="messages back in the queue")


async def test_dlq_cli_purge_refuses_without_yes(broker: Broker) -> None:
    env = {**os.environ, "TALLY_AMQP_NAMESPACE": broker.names.namespace}
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "dlq", "purge"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--yes" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "dlq", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and json.loads(result.stdout) == []


async def _depth(broker: Broker, queue: str, n: int) -> bool:
    return await broker.queue_depth(queue) == n


async def test_readyz_reports_the_broker_down_and_recovers(client) -> None:
    publisher = client.app[appkeys.PUBLISHER]
    assert (await client.get("/readyz")).status == 200
    good_url = publisher.amqp_url
    await publisher.close()
    publisher.amqp_url = "amqp://guest:guest@127.0.0.1:1/"  # connection refused: the broker is "down"
    try:
        r = await client.get("/readyz")
        assert r.status == 503 and r.content_type == "application/problem+json"
        body = await r.json()
        assert body["checks"]["broker"].startswith("down") and body["checks"]["database"] == "ok"
        assert "broker" in body["detail"]
        r = await client.get("/v1/customers")
        assert r.status == 401  # reads do not depend on the broker
    finally:
        publisher.amqp_url = good_url
    assert (await client.get("/readyz")).status == 200


async def test_a_publish_the_queue_refuses_is_unavailable_and_the_next_goes_out_on_a_new_channel(
    broker: Broker,
) -> None:
    # A negative confirm, provoked by a policy that limits the ingest queue to one message (its
    # overflow is reject-publish; nothing consumes it here). After one, the publisher reopens
    # its channel: a quorum queue's state on a channel can keep refusing after the queue's
    # leader has moved.
    if rabbitmqctl_problem() is not None:
        assert not os.environ.get("TALLY_REQUIRE_RABBITMQCTL"), rabbitmqctl_problem()
        pytest.skip(f"needs rabbitmqctl to set a queue policy ({rabbitmqctl_problem()})")
    publisher = Publisher(AMQP_URL, broker.names)
    policy = f"{broker.names.namespace}-refuse"
    body = orjson.dumps(usage("org", "c1"))
    try:
        await publisher.publish(event_message(body, batch=False), "usage.recorded")
        first = publisher._channel
        rabbitmqctl(
            "set_policy", policy, f"^{re.escape(broker.names.ingest)}$", '{"max-length": 1}', "--apply-to", "queues"
        )
        await wait_until(lambda: _refused(publisher, body), timeout=30, what="a publish the queue refuses")
        assert not publisher.connected  # the refusing channel is gone
        rabbitmqctl("clear_policy", policy)
        await wait_until(lambda: _taken(publisher, body), timeout=30, what="a publish taken again")
        assert publisher.connected and publisher._channel is not first
    finally:
        if RABBITMQCTL is not None:
            subprocess.run([RABBITMQCTL, "-q", "clear_policy", policy], cwd="/", capture_output=True, timeout=60)
        await publisher.close()


async def _refused(publisher: Publisher, body: bytes) -> bool:
    try:
        await publisher.publish(event_message(body, batch=False), "usage.recorded")
    except Unavailable as exc:
        assert "did not confirm" in str(exc), exc
        return True
    return False  # the policy has not reached the queue yet


async def _taken(publisher: Publisher, body: bytes) -> bool:
    return not await _refused(publisher, body)


async def test_consumer_reconnects_after_the_broker_cuts_its_connection(
    settings, pool, broker: Broker, org: Org
) -> None:
    # The broker's side closes the connection: through the management API, or rabbitmqctl.
    management = await management_problem(MANAGEMENT_URL)
    if management is not None and rabbitmqctl_problem() is not None:
        assert not (REQUIRE_MANAGEMENT or os.environ.get("TALLY_REQUIRE_RABBITMQCTL")), rabbitmqctl_problem()
        pytest.skip(f"needs the RabbitMQ management API ({management}) or rabbitmqctl ({rabbitmqctl_problem()})")
    reconnects = metrics.REGISTRY.get_sample_value("tally_broker_reconnects_total") or 0
    async with running_consumer(settings, pool, broker) as consumer:
        await barrier(pool, broker, org)
        await _close_connection_by_name(consumer.connection_name, management is None)
        await wait_until(lambda: _reconnected(reconnects), what="a reconnect")
        await wait_until(lambda: _true(consumer.connected.is_set()), what="consumer connected again")
        assert await broker.consumer_count(broker.names.ingest) == 1
        await barrier(pool, broker, org)  # still consuming


async def _reconnected(before: float) -> bool:
    return (metrics.REGISTRY.get_sample_value("tally_broker_reconnects_total") or 0) > before


async def _true(value: bool) -> bool:
    return value


async def _close_connection_by_name(name: str, by_management: bool) -> None:
    """Close a client connection from the broker's side, as a network cut or a node
    restart would (with the management API, else with rabbitmqctl)."""
    if not by_management:
        for line in rabbitmqctl("list_connections", "pid", "client_properties").splitlines():
            if name in line:
                rabbitmqctl("close_connection", line.split("\t")[0], "test cut")
        return
    headers = {"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def listed() -> bool:
            async with session.get("http://127.0.0.1:15672/api/connections") as r:
                return any(c.get("client_properties", {}).get("connection_name") == name for c in await r.json())

        await wait_until(listed, timeout=30, interval=0.5, what="connection visible to management")
        async with session.get("http://127.0.0.1:15672/api/connections") as r:
            conns = [c["name"] for c in await r.json() if c.get("client_properties", {}).get("connection_name") == name]
        for conn_name in conns:
            async with session.delete(
                f"http://127.0.0.1:15672/api/connections/{aiohttp.helpers.quote(conn_name, safe='')}"
            ):
                pass


async def test_logs_never_contain_keys(client, org: Org, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = org.key[:-4] + "AAAA"
    await client.get("/v1/customers", headers=org.headers())
    await client.get("/v1/customers", headers={"Authorization": f"Bearer {wrong}"})
    await client.get("/v1/customers", headers={"x-client-key": org.key.partition(".")[0], "x-client-secret": "nope"})
    await client.get("/v1/customers/nobody", headers=org.headers())
    await client.post("/v1/customers", json={"customer_identifier": org.key}, headers=org.headers(org.read_key))
    assert caplog.records, "the access log should have written lines"
    secret = org.key.partition(".")[2]
    for record in caplog.records:
        text = record.getMessage() + " " + " ".join(str(v) for v in vars(record).values())
        assert secret not in text and wrong.partition(".")[2] not in text
    access = [r for r in caplog.records if r.name == "tally.access"]
    assert access and all(getattr(r, "request_id", None) for r in access)


async def test_keys_are_stored_hashed(pool: asyncpg.Pool, org: Org) -> None:
    secret = org.key.partition(".")[2]
    dump = await pool.fetchval("SELECT string_agg(k::text, ' ') FROM api_keys k WHERE organization_id = $1", org.id)
    assert secret not in dump and org.key not in dump


def test_compose_file_runs_only_real_commands() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "rabbitmq", "migrate", "api", "consumer"} <= set(services)
    parser = build_parser()
    for name, service in services.items():
        command = service.get("command")
        if command and command[0] == "tally":
            parser.parse_args(command[1:])  # raises SystemExit for an unknown command
            assert service.get("build") or service.get("image") == "tally:latest", name
    assert services["consumer"]["deploy"]["replicas"] == 2
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for app in ("api", "consumer"):
        needs = services[app]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["rabbitmq"]["condition"] == "service_healthy"
    assert "management" in services["rabbitmq"]["image"]
    assert all("healthcheck" in services[s] for s in ("postgres", "rabbitmq", "api", "consumer"))
    env = services["api"]["environment"]
    assert env["TALLY_DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["TALLY_DATABASE_URL"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "TALLY_MIGRATIONS_DIR=/app/migrations" in dockerfile and "COPY migrations" in dockerfile


def test_monitoring_files_use_real_metrics() -> None:
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in prometheus["scrape_configs"]}
    assert jobs == {"tally-api", "tally-consumer"}
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    known = {m.name for m in metrics.REGISTRY.collect()}
    import re

    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b(tally_[a-z_]+)", target["expr"]):
                base = re.sub(r"_(bucket|sum|count|total)$", "", name)
                assert base in known or name in known, (panel["title"], name)
