"""``tally api``, ``tally consume``, ``tally webhooks``, ``tally dev``: the processes that serve, until SIGTERM."""

from __future__ import annotations

import argparse
import errno
from typing import TYPE_CHECKING

import asyncpg

from service.cli.common import Unreachable, database_problem, install_uvloop
from service.infra.settings import Settings

if TYPE_CHECKING:  # the web stack loads only for the commands that serve
    from aiohttp import web


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    commands.add_parser("api", help="serve the HTTP API (TALLY_HTTP_PORT)").set_defaults(sync=cmd_api)
    commands.add_parser(
        "consume",
        help="run the event consumer: TALLY_CONSUMER_PROCESSES processes, one per core by default "
        "(health and metrics on TALLY_CONSUMER_HTTP_PORT)",
    ).set_defaults(sync=cmd_consume)
    commands.add_parser(
        "webhooks", help="only dispatch webhooks (health and metrics on TALLY_CONSUMER_HTTP_PORT)"
    ).set_defaults(sync=cmd_webhooks)
    commands.add_parser(
        "dev", help="API and consumer in one process, all on TALLY_HTTP_PORT (laptop default)"
    ).set_defaults(sync=cmd_dev)


def _serve(app: web.Application, settings: Settings, host: str, port: int, setting: str, banner: list[str]) -> int:
    """Serve until SIGTERM, then drain (service/web/server.py). ``setting`` names the port's
    variable, for the message when the port is taken."""
    from service.web.server import serve

    install_uvloop()
    try:
        serve(app, settings, host, port, banner)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise Unreachable(
                f"port {port} on {host} is in use ({setting}): stop what holds it, or set {setting} to a free port"
            ) from exc
        raise database_problem(exc, settings) or exc from exc
    except asyncpg.PostgresError as exc:
        raise database_problem(exc, settings) or exc from exc
    return 0


def _base_url(settings: Settings, port: int) -> str:
    host = settings.http_host if settings.http_host not in ("0.0.0.0", "::", "") else "localhost"
    return settings.public_url.rstrip("/") if settings.public_url else f"http://{host}:{port}"


def _api_banner(settings: Settings, dev: bool) -> list[str]:
    base = _base_url(settings, settings.http_port)
    lines = [f"tally API: {base} — interactive docs at {base}/docs, OpenAPI at {base}/openapi.json"]
    if dev:
        lines.append(f"consumer (in this process): health, readiness and metrics at {base}/healthz, /readyz, /metrics")
    lines += [
        "next: 'tally orgs create NAME', then 'tally keys create --org NAME --scopes read,write' for a key,",
        "      or 'tally demo' for data at once; 'tally status' shows the queues and dead letters",
    ]
    return lines


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    from service.api.app import create_app

    return _serve(
        create_app(settings),
        settings,
        settings.http_host,
        settings.http_port,
        "TALLY_HTTP_PORT",
        _api_banner(settings, dev=False),
    )


def cmd_consume(args: argparse.Namespace, settings: Settings) -> int:
    """The consumer, with /healthz, /readyz and /metrics on TALLY_CONSUMER_HTTP_PORT; in
    TALLY_CONSUMER_PROCESSES processes (service/cli/processes.py) where that is more than one."""
    count = settings.consumer_process_count
    if count > 1:
        from service.cli.processes import supervise

        return supervise(count)
    from consumers.app import create_consumer_app
    from service.api.webhooks import webhook_shape

    base = _base_url(settings, settings.consumer_http_port)
    banner = [f"tally consumer: health, readiness and metrics at {base}/healthz, /readyz, /metrics"]
    return _serve(
        create_consumer_app(settings, webhook_shape()),
        settings,
        settings.http_host,
        settings.consumer_http_port,
        "TALLY_CONSUMER_HTTP_PORT",
        banner,
    )


def cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    """The webhook dispatcher alone: for consumers run with TALLY_WEBHOOK_DISPATCH=false."""
    from consumers.app import create_webhooks_app
    from service.api.webhooks import webhook_shape

    base = _base_url(settings, settings.consumer_http_port)
    return _serve(
        create_webhooks_app(settings, webhook_shape()),
        settings,
        settings.http_host,
        settings.consumer_http_port,
        "TALLY_CONSUMER_HTTP_PORT",
        [f"tally webhooks: health, readiness and metrics at {base}/healthz, /readyz, /metrics"],
    )


def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    """The API and the consumer in one process: the laptop default."""
    from consumers.app import add_consumer
    from service.api.app import create_app
    from service.api.webhooks import webhook_shape

    app = create_app(settings)
    add_consumer(app, webhook_shape())
    return _serve(
        app, settings, settings.http_host, settings.http_port, "TALLY_HTTP_PORT", _api_banner(settings, dev=True)
    )
