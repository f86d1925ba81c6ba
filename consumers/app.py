"""The consumer process: a tiny aiohttp app (health, readiness, metrics) with the ingest loop,
the housekeeping jobs and the webhook dispatcher as cleanup contexts, so SIGTERM handling and
shutdown are aiohttp's, as for the API. Shutdown runs in reverse: the webhook dispatcher stops
(an attempt cut short is attempted again once its lease ends), then the ingest loop drains
(commits and acks the batch in hand) before housekeeping stops."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

from consumers.housekeeping import Housekeeping
from consumers.ingest import DRAIN_GRACE, Consumer
from consumers.webhooks import Dispatcher, running
from service.infra.settings import Settings
from service.store.rendering import Shape
from service.web.app import add_operations, base_app
from service.web.appkeys import POOL, READINESS_CHECKS, SETTINGS

log = logging.getLogger("tally.consumer")

CONSUMER = web.AppKey("consumer", Consumer)
# How a webhook shows a customer: the API's canonical shape, handed in by the CLI (the consumers
# do not import the API).
WEBHOOK_SHAPE = web.AppKey("webhook_shape", Shape)
# Exit code when the consumer dies of a bug: a supervisor restarts the process rather
# than leave one alive that no longer consumes.
EXIT_CONSUMER_CRASHED = 70


async def consumer_context(app: web.Application) -> AsyncIterator[None]:
    consumer = Consumer(app[SETTINGS], app[POOL])
    app[CONSUMER] = consumer
    task = asyncio.create_task(consumer.run(), name="tally-consumer")

    def crashed(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.critical("consumer crashed; exiting", exc_info=t.exception())
            os._exit(EXIT_CONSUMER_CRASHED)

    task.add_done_callback(crashed)
    yield
    task.remove_done_callback(crashed)
    await consumer.stop()
    try:
        await asyncio.wait_for(task, DRAIN_GRACE + 5)
    except TimeoutError:
        log.error("consumer did not drain in time; unacked messages will be redelivered")
        task.cancel()


async def housekeeping_context(app: web.Application) -> AsyncIterator[None]:
    consumer = app[CONSUMER]
    housekeeping = Housekeeping(
        app[SETTINGS], app[POOL], alerts_recorded=consumer.alerts_recorded, started_consuming=consumer.started_consuming
    )
    housekeeping.start()
    yield
    await housekeeping.stop()


async def webhooks_context(app: web.Application) -> AsyncIterator[None]:
    # Beside a consumer, its commits wake the dispatcher, and it yields to the fold while the
    # fold has a backlog; alone (`tally webhooks`), it polls.
    consumer = app.get(CONSUMER)
    wake = consumer.committed if consumer is not None else None
    behind = (lambda: consumer.backlogged) if consumer is not None else (lambda: False)
    dispatcher = Dispatcher(app[SETTINGS], app[POOL], app[WEBHOOK_SHAPE], wake=wake, behind=behind)
    async with running(dispatcher):
        yield


async def broker_check(app: web.Application) -> None:
    if not app[CONSUMER].connected.is_set():
        raise ConnectionError("consumer is not connected to the broker")


def add_consumer(app: web.Application, webhook_shape: Shape | None = None) -> None:
    """The ingest loop and housekeeping; with ``webhook_shape``, the webhook dispatcher too
    (unless TALLY_WEBHOOK_DISPATCH is off)."""
    app.cleanup_ctx.append(consumer_context)
    app.cleanup_ctx.append(housekeeping_context)
    if webhook_shape is not None and app[SETTINGS].webhook_dispatch:
        app[WEBHOOK_SHAPE] = webhook_shape
        app.cleanup_ctx.append(webhooks_context)
    # "consumer": connected to the broker and consuming; it is also the process's "broker"
    # entry, except in `tally dev`, where the API's own broker check (its publisher) has it.
    checks = app[READINESS_CHECKS]
    checks["consumer"] = broker_check
    checks.setdefault("broker", broker_check)


def create_consumer_app(settings: Settings, webhook_shape: Shape | None = None) -> web.Application:
    app = base_app(settings)
    add_operations(app)
    add_consumer(app, webhook_shape)
    return app


def create_webhooks_app(settings: Settings, webhook_shape: Shape) -> web.Application:
    """The webhook dispatcher alone (`tally webhooks`), with health, readiness and metrics."""
    app = base_app(settings)
    add_operations(app)
    app[WEBHOOK_SHAPE] = webhook_shape
    app.cleanup_ctx.append(webhooks_context)
    return app
