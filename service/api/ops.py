"""Operator routes (the ops scope)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from service.api import appkeys
from service.api.routing import OPERATIONS_TAG, Call, Endpoint, NoQuery
from service.infra.broker import Names
from service.infra.errors import Unavailable
from service.infra.queues import QueueStats, queue_stats


class QueuesOut(BaseModel):
    queues: list[QueueStats]


async def queues(call: Call[NoQuery, None]) -> web.Response:
    settings = call.request.app[appkeys.SETTINGS]
    try:
        stats = await queue_stats(settings.amqp_url, settings.amqp_management_url, Names(settings.amqp_namespace))
    except (OSError, ConnectionError) as exc:
        raise Unavailable(f"message broker unreachable: {type(exc).__name__}") from exc
    return web.Response(body=QueuesOut(queues=stats).model_dump_json(), content_type="application/json")


ENDPOINTS = [
    Endpoint(
        "GET",
        "/v1/ops/queues",
        queues,
        "Queue depths, consumers and rates",
        OPERATIONS_TAG,
        "ops",
        response=QueuesOut,
        description="Ingest, dead-letter and budget-alert queues. Unacknowledged counts and rates come from the "
        "RabbitMQ management API and are null when it is unreachable.",
    ),
]
