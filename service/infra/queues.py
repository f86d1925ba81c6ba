"""Queue statistics for operators: from the RabbitMQ management API when it is reachable
(ready, unacknowledged, consumers, publish and deliver rates), degrading to what AMQP alone
can tell (ready and consumers) when it is not."""

from __future__ import annotations

import base64
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import aiohttp
from pydantic import BaseModel, Field

from service.infra.broker import BrokerNodes, Names, broker_urls

MANAGEMENT_TIMEOUT = 3.0


class QueueStats(BaseModel):
    """One queue as an operator sees it (``tally queues``, ``GET /v1/ops/queues``)."""

    name: str
    ready: int = Field(description="Messages waiting for a consumer.")
    unacknowledged: int | None = Field(description="Delivered, not yet acked (null without the management API).")
    consumers: int
    publish_rate: float | None = Field(description="Messages/s published (null without the management API).")
    deliver_rate: float | None = Field(description="Messages/s delivered (null without the management API).")
    source: Literal["management", "amqp"] = Field(description="Where the figures come from.")


def _vhost(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


async def _management_stats(management_url: str, vhost: str, queue: str) -> QueueStats:
    parts = urlsplit(management_url)
    credentials = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
    headers = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}
    base = f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{parts.path.rstrip('/')}"
    url = f"{base}/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}"
    timeout = aiohttp.ClientTimeout(total=MANAGEMENT_TIMEOUT)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session, session.get(url) as response:
        response.raise_for_status()
        data = await response.json()
    stats = data.get("message_stats") or {}
    return QueueStats(
        name=queue,
        ready=int(data.get("messages_ready", 0)),
        unacknowledged=int(data.get("messages_unacknowledged", 0)),
        consumers=int(data.get("consumers", 0)),
        publish_rate=float((stats.get("publish_details") or {}).get("rate", 0.0)),
        deliver_rate=float((stats.get("deliver_get_details") or {}).get("rate", 0.0)),
        source="management",
    )


async def queue_stats(amqp_url: str, management_url: str | None, names: Names) -> list[QueueStats]:
    """Statistics of the ingest and dead-letter queues."""
    queues = (names.ingest, names.dead)
    if management_url:
        try:
            return [await _management_stats(management_url, _vhost(broker_urls(amqp_url)[0]), q) for q in queues]
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            pass  # degrade to AMQP
    connection = await BrokerNodes(amqp_url).connect(timeout=10)
    try:
        out = []
        for queue in queues:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                result = declared.declaration_result
                ready, consumers = result.message_count or 0, result.consumer_count or 0
            except aio_pika.exceptions.ChannelClosed:  # not declared yet: nothing in it
                ready = consumers = 0
            out.append(
                QueueStats(
                    name=queue,
                    ready=ready,
                    unacknowledged=None,
                    consumers=consumers,
                    publish_rate=None,
                    deliver_rate=None,
                    source="amqp",
                )
            )
        return out
    finally:
        await connection.close()
