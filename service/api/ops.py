"""Operator routes (admin scope)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from consumers.broker import Names
from consumers.ops import queue_stats
from service.api import appkeys
from service.api.routing import Endpoint
from service.errors import Unavailable


class QueueStatsOut(BaseModel):
    name: str
    ready: int
    unacknowledged: int | None
    consumers: int
    publish_rate: float | None
    deliver_rate: float | None
    source: str


class QueuesOut(BaseModel):
    queues: list[QueueStatsOut]


async def queues(request: web.Request) -> web.Response:
    settings = request.app[appkeys.SETTINGS]
    try:
        stats = await queue_stats(settings.amqp_url, settings.amqp_management_url, Names(settings.amqp_namespace))
    except (OSError, ConnectionError) as exc:
        raise Unavailable(f"message broker unreachable: {type(exc).__name__}") from exc
    return web.json_response({"queues": [s.as_dict() for s in stats]})


ENDPOINTS = [
    Endpoint("GET", "/v1/ops/queues", queues, "Queue depths, consumers and rates", "operations", "ops",
             response=QueuesOut, errors=(503,),
             description="Ingest and dead-letter queues. Unacknowledged counts and rates come from the RabbitMQ "
                         "management API and are null when it is unreachable."),
]  # fmt: skip
