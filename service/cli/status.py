"""``tally migrate`` and ``tally status``: the database's schema, and one screen of everything
an operator checks first."""

from __future__ import annotations

import argparse

import asyncpg

from service.cli.common import JSON_HELP, broker_problem, database_problem, print_json, table
from service.cli.queues import queue_table
from service.infra.migrate import migrate, pending
from service.infra.settings import Settings


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    commands.add_parser("migrate", help="create the database if missing and apply migrations").set_defaults(
        run=cmd_migrate
    )
    status = commands.add_parser("status", help="database, broker, queues, backlog and dead letters on one screen")
    status.add_argument("--json", action="store_true", help=JSON_HELP)
    status.set_defaults(run=cmd_status)


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    await migrate(settings.database_url, settings.migrations_dir, report=lambda line: print(line, flush=True))
    return 0


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """One screen: can tally reach its database (migrated?) and broker; queue depths,
    consumers and rates; the backlog (ready and held unacknowledged by consumers) and how long
    it takes to drain; dead letters; budget alerts waiting for downstream services."""
    from service.infra.broker import ALERTS_MAX_LENGTH, Names
    from service.infra.queues import queue_report

    names = Names(settings.amqp_namespace)
    checks: dict[str, str] = {}
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
        try:
            waiting = await pending(conn, settings.migrations_dir)
        finally:
            await conn.close()
        checks["database"] = "ok" if not waiting else f"{len(waiting)} migration(s) pending: run 'tally migrate'"
    except Exception as exc:
        checks["database"] = f"down: {database_problem(exc, settings) or exc}"
    stats = []
    management: str | None = None
    try:
        report = await queue_report(settings.amqp_url, settings.amqp_management_url, names)
        stats, management = report.queues, report.management_problem
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"down: {broker_problem(exc, settings)}"
    notes = []
    by_name = {q.name: q for q in stats}
    ingest, dead, alerts = by_name.get(names.ingest), by_name.get(names.dead), by_name.get(names.alerts)
    if management and stats:
        notes.append(f"UNACKED and rates are n/a: they come from the RabbitMQ management API, and {management}")
    if ingest is not None:
        if ingest.consumers == 0:
            notes.append(f"no consumer on {names.ingest}: start 'tally consume' (or 'tally dev')")
        notes += backlog_notes(ingest.ready, ingest.unacknowledged, ingest.deliver_rate)
    if dead is not None and dead.ready:
        notes.append(f"{dead.ready} dead letter(s) in {names.dead}: 'tally dlq list' says why")
    if alerts is not None and alerts.ready:
        notes.append(
            f"{alerts.ready} budget alert(s) waiting in {names.alerts} for your services to consume "
            f"(at most {ALERTS_MAX_LENGTH:,} are kept; older ones are dropped)"
        )
    healthy = all(state == "ok" for state in checks.values())
    if args.json:
        print_json(
            {
                "checks": checks,
                "queues": [q.model_dump() for q in stats],
                "management": management or "ok",
                "notes": notes,
                "ok": healthy,
            }
        )
    else:
        table(["CHECK", "STATE"], [[name, state] for name, state in checks.items()])
        if stats:
            print()
            queue_table(stats)
        if notes:
            print()
            for note in notes:
                print(f"- {note}")
    return 0 if healthy else 1


def backlog_notes(ready: int, unacknowledged: int | None, deliver_rate: float | None) -> list[str]:
    """The ingest backlog in messages: ready ones, and those consumers hold unacknowledged
    (prefetched, or in the batch being folded: a backlog can sit there with 0 ready)."""
    if unacknowledged is None:
        held = "plus any held unacknowledged by consumers, which only the management API can count"
        return [f"backlog: {ready} message(s) ready, {held}"] if ready else [f"backlog: 0 ready ({held})"]
    backlog = ready + unacknowledged
    if not backlog:
        return []
    text = f"backlog: {backlog} message(s) ({ready} ready, {unacknowledged} held unacknowledged by consumers)"
    if deliver_rate:
        return [f"{text}, draining at {deliver_rate:.0f}/s (~{backlog / deliver_rate:.0f} s)"]
    return [f"{text}, not draining" if ready else text]
