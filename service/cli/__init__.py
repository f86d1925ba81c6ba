"""The ``tally`` command line: the argument tree, assembled from one module per command group,
and the translation of what went wrong into a message and an exit code (2: the input is
wrong; 1: a dependency is). Each group's module registers its commands:

- serve.py: ``api``, ``consume`` (several processes: processes.py), ``webhooks``, ``dev``;
- status.py: ``migrate``, ``status``;
- demo.py: ``demo``;
- queues.py: ``queues``, ``dlq``, ``namespace``;
- orgs.py: ``orgs``, ``keys``;
- export.py: ``export``.
"""

from __future__ import annotations

import argparse
import sys

import asyncpg

from service import __version__
from service.cli import demo, export, orgs, queues, serve, status
from service.cli.common import Unreachable, database_problem, run
from service.domain.errors import DomainError
from service.infra import logs
from service.infra.migrate import MigrationError
from service.infra.settings import Settings

# Also what `tally --help` lists, in this order.
GROUPS = (status, serve, demo, queues, orgs, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tally",
        description="tally: a customer read-model service (events in over RabbitMQ, customer lists out over HTTP).",
        epilog="Start with 'tally migrate', then 'tally dev' (API and consumer in one process) and 'tally demo'. "
        "Settings come from TALLY_* environment variables (docs/configuration.md).",
    )
    parser.add_argument("--version", action="version", version=f"tally {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    settings = Settings()
    logs.configure(settings.log_level, settings.log_format)
    try:
        if hasattr(args, "sync"):
            result: int = args.sync(args, settings)
            return result
        return run(args.run(args, settings))
    except (DomainError, MigrationError, ValueError) as exc:
        print(f"tally: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"tally: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        problem = database_problem(exc, settings)
        print(f"tally: {problem or exc}", file=sys.stderr)
        return 1
