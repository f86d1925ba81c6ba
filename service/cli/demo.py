"""``tally demo``: a synthetic event stream, published for real (consumers/demo.py)."""

from __future__ import annotations

import argparse

from service.infra.settings import Settings


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="publish a synthetic event stream, with a budget alert that fires (prints a write and a read key)",
    )
    demo.add_argument("--orgs", type=int, default=3, help="organizations, 1-5 (default 3)")
    demo.add_argument("--customers", type=int, default=3000, help="customers (default 3000)")
    demo.add_argument("--events", type=int, default=100_000, help="usage events (default 100000)")
    demo.add_argument("--days", type=int, default=21, help="days of history (default 21)")
    demo.add_argument("--batch", type=int, default=500, help="events per broker message (default 500)")
    demo.add_argument(
        "--seed", type=int, default=7, help="random seed: the same seed gives the same stream (default 7)"
    )
    demo.set_defaults(run=cmd_demo)


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from consumers.demo import run_demo

    return await run_demo(
        settings,
        orgs=args.orgs,
        customers=args.customers,
        events=args.events,
        days=args.days,
        batch=args.batch,
        seed=args.seed,
    )
