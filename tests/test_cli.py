"""The ``tally`` command as a newcomer meets it: help, errors that name the dependency and the
fix, tables with headers, ``tally status``, ``tally namespace delete``."""

from __future__ import annotations

import socket
from typing import Any

import orjson
import pytest

from service.cli.status import backlog_notes
from service.infra.settings import Settings
from service.store.alerts import ALERT_ROUTING_KEY
from tests.eventkit import Broker
from tests.support import tally


def test_tally_alone_prints_help() -> None:
    result = tally()
    assert result.returncode == 0, result.stderr
    for command in (
        "migrate",
        "api",
        "consume",
        "webhooks",
        "dev",
        "status",
        "demo",
        "queues",
        "dlq",
        "namespace",
        "orgs",
        "keys",
    ):
        assert command in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["demo"],
        ["queues"],
        ["status"],
        ["dlq", "list"],
        ["dlq", "replay"],
        ["dlq", "purge"],
        ["orgs", "create"],
        ["orgs", "list"],
        ["keys", "create"],
        ["keys", "list"],
        ["keys", "revoke"],
        ["namespace", "delete"],
    ],
)
def test_every_option_has_help(command: list[str]) -> None:
    result = tally(*command, "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    options = [
        i for i, line in enumerate(lines) if line.strip().startswith("--") and not line.strip().startswith("--help")
    ]
    for i in options:
        # argparse prints the help on the option's line, or on the next when the option is long
        own = lines[i].strip().split("  ", 1)
        assert len(own) == 2 and own[1].strip() or lines[i + 1].startswith(" " * 10), (command, lines[i])


def test_database_down_names_where_and_what_to_do() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tally("orgs", "list", env={"TALLY_DATABASE_URL": f"postgresql://127.0.0.1:{port}/tally"})
    assert result.returncode == 1
    assert f"PostgreSQL at 127.0.0.1:{port}" in result.stderr and "TALLY_DATABASE_URL" in result.stderr, result.stderr


def test_a_missing_database_says_to_migrate(settings: Settings) -> None:
    url = settings.database_url.rsplit("/", 1)[0] + "/tally_never_created_here"
    result = tally("keys", "list", "--org", "x", env={"TALLY_DATABASE_URL": url})
    assert result.returncode == 1
    assert "'tally_never_created_here' does not exist" in result.stderr and "tally migrate" in result.stderr


def test_a_port_in_use_names_the_setting(migrated: str, settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = tally(
            "api",
            env={
                "TALLY_DATABASE_URL": settings.database_url,
                "TALLY_HTTP_HOST": "127.0.0.1",
                "TALLY_HTTP_PORT": str(port),
            },
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use (TALLY_HTTP_PORT)" in result.stderr, result.stderr


def test_lists_have_headers_and_organization_names(migrated: str, settings: Settings, org: Any) -> None:
    env = {"TALLY_DATABASE_URL": settings.database_url}
    orgs = tally("orgs", "list", env=env)
    assert orgs.returncode == 0, orgs.stderr
    assert orgs.stdout.splitlines()[0].split() == ["NAME", "TIME", "ZONE", "CUSTOMERS", "LIVE", "KEYS", "CREATED", "ID"]
    assert org.name in orgs.stdout
    keys = tally("keys", "list", "--org", org.name, env=env)
    assert keys.returncode == 0, keys.stderr
    assert org.name in keys.stdout.splitlines()[0]
    assert keys.stdout.splitlines()[1].split()[:3] == ["CLIENT", "KEY", "SCOPES"]


async def test_status_and_namespace_delete(migrated: str, settings: Settings, org: Any) -> None:
    async with Broker() as broker:
        await broker.publish(b"not json")  # no consumer runs: it waits in the ingest queue
        await broker.publish(b"{}", routing_key=ALERT_ROUTING_KEY)  # a budget alert nobody consumed yet
        env = {
            "TALLY_DATABASE_URL": settings.database_url,
            "TALLY_AMQP_NAMESPACE": broker.names.namespace,
            "TALLY_AMQP_MANAGEMENT_URL": "http://guest:guest@127.0.0.1:1/",  # nothing listens on port 1
        }
        status = tally("status", "--json", env=env)
        report = orjson.loads(status.stdout)
        assert report["checks"] == {"database": "ok", "broker": "ok"}
        assert status.returncode == 0, status.stderr
        notes = "\n".join(report["notes"])
        assert "no consumer" in notes, notes
        # Why rates and unacked are n/a, and how to turn them on.
        assert "rabbitmq-plugins enable rabbitmq_management" in report["management"], report
        assert "n/a" in notes and "rabbitmq-plugins enable rabbitmq_management" in notes, notes
        # The backlog consumers may hold unacknowledged is said to be invisible, not shown as 0.
        assert "backlog: 1 message(s) ready, plus any held unacknowledged" in notes, notes
        assert f"1 budget alert(s) waiting in {broker.names.alerts}" in notes, notes
        assert broker.names.alerts in {q["name"] for q in report["queues"]}
        text = tally("status", env=env)
        assert "CHECK" in text.stdout and "QUEUE" in text.stdout and broker.names.ingest in text.stdout
        assert broker.names.alerts in text.stdout and "rabbitmq-plugins enable" in text.stdout
        queues = tally("queues", env=env)
        assert "n/a" in queues.stdout and "rabbitmq-plugins enable rabbitmq_management" in queues.stdout

        refused = tally("namespace", "delete", env=env)  # no terminal to ask and no --yes
        assert refused.returncode == 2 and "--yes" in refused.stderr
        assert await broker.queue_depth(broker.names.ingest) == 1
        deleted = tally("namespace", "delete", "--yes", env=env)
        assert deleted.returncode == 0, deleted.stderr
        gone = tally("queues", "--json", env=env)
        assert all(q["ready"] == 0 and q["consumers"] == 0 for q in orjson.loads(gone.stdout))


@pytest.mark.parametrize(
    ("ready", "unacked", "rate", "says"),
    [
        (0, 40_000, None, "backlog: 40000 message(s) (0 ready, 40000 held unacknowledged by consumers)"),
        (10, 30, 20.0, "backlog: 40 message(s) (10 ready, 30 held unacknowledged by consumers), draining at 20/s"),
        (5, 0, None, "backlog: 5 message(s) (5 ready, 0 held unacknowledged by consumers), not draining"),
        (0, None, None, "backlog: 0 ready (plus any held unacknowledged by consumers, which only the management"),
    ],
)
def test_the_backlog_counts_what_consumers_hold(ready: int, unacked: int | None, rate: float | None, says: str) -> None:
    [note] = backlog_notes(ready, unacked, rate)
    assert note.startswith(says), note


def test_no_backlog_says_nothing() -> None:
    assert backlog_notes(0, 0, 12.0) == []


def test_status_says_when_the_database_is_down(settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tally("status", "--json", env={"TALLY_DATABASE_URL": f"postgresql://127.0.0.1:{port}/tally"})
    assert result.returncode == 1
    assert orjson.loads(result.stdout)["checks"]["database"].startswith("down: cannot reach PostgreSQL")
