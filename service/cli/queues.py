"""``tally queues``, ``tally dlq`` and ``tally namespace``: the broker side, for operators."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import asyncpg

from service.cli.common import JSON_HELP, broker, confirmed, counter, print_json, table
from service.infra.settings import Settings
from service.store import auth

REASON_HELP = (
    "only letters whose reason contains this text (case-insensitive), or whose reason code it is "
    "(unknown_organization, unroutable, ...)"
)


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    queues = commands.add_parser("queues", help="depth, consumers and rates of the ingest and dead-letter queues")
    queues.add_argument("--json", action="store_true", help=JSON_HELP)
    queues.set_defaults(run=cmd_queues)

    dlq = commands.add_parser("dlq", help="dead letters: list, replay, purge").add_subparsers(
        dest="dlq_command", required=True, metavar="ACTION"
    )
    listing = dlq.add_parser("list", help="reason, event type, id, organization, time of death")
    listing.add_argument("--limit", type=int, default=100, help="show at most this many (default 100)")
    listing.add_argument("--reason", help=REASON_HELP)
    listing.add_argument("--json", action="store_true", help=JSON_HELP)
    listing.set_defaults(run=cmd_dlq)
    replay = dlq.add_parser(
        "replay",
        help="re-publish to the events exchange (deduped: never double counts); forbidden_publisher "
        "letters only with --reason",
    )
    replay.add_argument("--reason", help=REASON_HELP)
    replay.add_argument("--limit", type=int, help="replay at most this many")
    replay.set_defaults(run=cmd_dlq)
    purge = dlq.add_parser("purge", help="delete dead letters (asks first unless --yes)")
    purge.add_argument("--reason", help=REASON_HELP)
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(run=cmd_dlq)

    namespace = commands.add_parser("namespace", help="the broker namespace (TALLY_AMQP_NAMESPACE)").add_subparsers(
        dest="namespace_command", required=True, metavar="ACTION"
    )
    delete = namespace.add_parser("delete", help="delete a namespace's queues and exchanges (asks first unless --yes)")
    delete.add_argument("--namespace", help="which one (default: TALLY_AMQP_NAMESPACE)")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.set_defaults(run=cmd_namespace_delete)


async def cmd_queues(args: argparse.Namespace, settings: Settings) -> int:
    from service.infra.broker import Names
    from service.infra.queues import queue_report

    async with broker(settings):
        report = await queue_report(settings.amqp_url, settings.amqp_management_url, Names(settings.amqp_namespace))
    if args.json:
        print_json([s.model_dump() for s in report.queues])
        return 0
    queue_table(report.queues)
    if report.management_problem:
        print(
            f"\nunacked and rates are n/a: they come from the RabbitMQ management API, and {report.management_problem}"
        )
    return 0


def queue_table(stats: list[Any]) -> None:
    table(
        ["QUEUE", "READY", "UNACKED", "CONSUMERS", "PUBLISH/S", "DELIVER/S"],
        [
            [
                q.name,
                q.ready,
                _cell(q.unacknowledged, "d"),
                q.consumers,
                _cell(q.publish_rate, ".1f"),
                _cell(q.deliver_rate, ".1f"),
            ]
            for q in stats
        ],
    )


def _cell(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


async def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    async with broker(settings):
        return await _dlq(args, settings)


async def _organization_names(settings: Settings) -> dict[str, str]:
    """Organization id → name, to show names where messages carry ids (empty if the
    database cannot be reached: the broker tools work without it)."""
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return {}
    try:
        return await auth.organization_names(conn)
    except asyncpg.PostgresError:
        return {}
    finally:
        await conn.close()


async def _dlq(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.deadletters import DeadLetters
    from service.infra.broker import Names

    async with DeadLetters(settings.amqp_url, Names(settings.amqp_namespace)) as dlq:
        if args.dlq_command == "list":
            infos = await dlq.list(limit=args.limit, reason=args.reason)
            if args.json:
                print_json([i.as_dict() for i in infos])
            else:
                names = await _organization_names(settings) if infos else {}
                table(
                    ["DIED AT", "TYPE", "EVENT ID", "ORGANIZATION", "REASON"],
                    [
                        [
                            i.first_death,
                            i.event_type,
                            i.event_id,
                            names.get(i.organization or "", i.organization),
                            i.reason,
                        ]
                        for i in infos
                    ],
                )
                print(f"{len(infos)} dead letter(s) shown", file=sys.stderr)
            return 0
        if args.dlq_command == "replay":
            replayed, kept = await dlq.replay(reason=args.reason, limit=args.limit, progress=counter("replayed"))
            print(f"\nreplayed {replayed}, left {kept} in {dlq.names.dead}", file=sys.stderr)
            return 0
        scope = f"matching '{args.reason}'" if args.reason else "ALL"
        if not confirmed(args.yes, f"Delete {scope} dead letters in {dlq.names.dead}? [y/N] ", "purge"):
            print("nothing purged")
            return 1
        purged, kept = await dlq.purge(reason=args.reason, progress=counter("purged"))
        print(f"\npurged {purged}, left {kept} in {dlq.names.dead}", file=sys.stderr)
        return 0


async def cmd_namespace_delete(args: argparse.Namespace, settings: Settings) -> int:
    """Delete a namespace's queues and exchanges (messages in them are lost), after asking."""
    from service.infra.broker import BrokerNodes, Names, delete_namespace
    from service.infra.queues import queue_stats

    names = Names(args.namespace or settings.amqp_namespace)
    async with broker(settings):
        stats = await queue_stats(settings.amqp_url, settings.amqp_management_url, names)
        held = ", ".join(f"{q.name}: {q.ready} message(s), {q.consumers} consumer(s)" for q in stats)
        question = (
            f"Delete namespace '{names.namespace}' ({', '.join((*names.exchanges, *names.queues))}; {held})? "
            "Messages in it are lost. [y/N] "
        )
        if not confirmed(args.yes, question, "delete a namespace"):
            print("nothing deleted")
            return 1
        connection = await BrokerNodes(settings.amqp_url).connect(timeout=10)
        try:
            await delete_namespace(connection, names)
        finally:
            await connection.close()
    print(f"deleted namespace '{names.namespace}'")
    return 0
