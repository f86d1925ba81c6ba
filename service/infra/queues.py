"""Queue statistics for operators: from the RabbitMQ management API when it is reachable
(ready, unacknowledged, consumers, publish and deliver rates), degrading to what AMQP alone
can tell (ready and consumers) when it is not — and then saying why, so that an operator
knows what to enable."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import aiohttp
from pydantic import BaseModel, Field

from service.infra.broker import BrokerNodes, Names, broker_urls

MANAGEMENT_TIMEOUT = 3.0
ENABLE_MANAGEMENT = "rabbitmq-plugins enable rabbitmq_management"


class QueueStats(BaseModel):
    """One queue as an operator sees it (``tally queues``, ``GET /v1/ops/queues``)."""

    name: str
    ready: int = Field(description="Messages waiting for a consumer.")
    unacknowledged: int | None = Field(description="Delivered, not yet acked (null without the management API).")
    consumers: int
    publish_rate: float | None = Field(description="Messages/s published (null without the management API).")
    deliver_rate: float | None = Field(description="Messages/s delivered (null without the management API).")
    source: Literal["management", "amqp"] = Field(description="Where the figures come from.")


@dataclass(frozen=True)
class QueueReport:
    """The queues' figures, and why the management API's were not available (None when they were)."""

    queues: list[QueueStats]
    management_problem: str | None


class ManagementUnavailable(Exception):
    """The management API cannot give the figures; the message says why, for an operator."""


def _vhost(amqp_url: str) -> str:
    path = urlsplit(amqp_url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def _base(management_url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(management_url)
    credentials = f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}"
    headers = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 15672}{parts.path.rstrip('/')}", headers


async def _get(management_url: str, path: str) -> dict[str, Any]:
    """One management API resource; ManagementUnavailable saying why it could not be read."""
    base, headers = _base(management_url)
    where = urlsplit(base).netloc
    timeout = aiohttp.ClientTimeout(total=MANAGEMENT_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(headers=headers, timeout=timeout) as session,
            session.get(base + path) as response,
        ):
            if response.status == 401:
                raise ManagementUnavailable(
                    f"the management API at {where} refused the credentials of TALLY_AMQP_MANAGEMENT_URL (401)"
                )
            if response.status != 200:
                raise ManagementUnavailable(f"the management API at {where} answered {response.status} for {path}")
            data = await response.json()
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise ManagementUnavailable(
            f"the management API at {where} did not answer within {MANAGEMENT_TIMEOUT:g} s"
        ) from None
    except (aiohttp.ClientConnectorError, OSError):
        raise ManagementUnavailable(
            f"nothing answers at {where} (TALLY_AMQP_MANAGEMENT_URL): the RabbitMQ management plugin is off? "
            f"Enable it with '{ENABLE_MANAGEMENT}'"
        ) from None
    except (aiohttp.ClientError, ValueError) as exc:
        raise ManagementUnavailable(
            f"what answers at {where} is not the RabbitMQ management API ({type(exc).__name__})"
        ) from None
    if not isinstance(data, dict):
        raise ManagementUnavailable(f"what answers at {where} is not the RabbitMQ management API")
    return data


async def management_problem(management_url: str | None) -> str | None:
    """Why the management API at ``management_url`` cannot be used, or None when it can."""
    if not management_url:
        return f"TALLY_AMQP_MANAGEMENT_URL is empty; enable the plugin ('{ENABLE_MANAGEMENT}') and set it"
    try:
        await _get(management_url, "/api/overview")
    except ManagementUnavailable as exc:
        return str(exc)
    return None


async def _management_stats(management_url: str, vhost: str, queue: str) -> QueueStats:
    data = await _get(management_url, f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}")
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


async def queue_report(amqp_url: str, management_url: str | None, names: Names) -> QueueReport:
    """Statistics of the ingest, dead-letter and alerts queues, from the management API when
    it answers, else from AMQP (with the reason the management API could not be used)."""
    queues = (names.ingest, names.dead, names.alerts)
    problem = None
    if management_url:
        vhost = _vhost(broker_urls(amqp_url)[0])
        try:
            return QueueReport([await _management_stats(management_url, vhost, q) for q in queues], None)
        except ManagementUnavailable as exc:
            problem = str(exc)
    else:
        problem = await management_problem(management_url)
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
        return QueueReport(out, problem)
    finally:
        await connection.close()


async def queue_stats(amqp_url: str, management_url: str | None, names: Names) -> list[QueueStats]:
    """Statistics of the ingest, dead-letter and alerts queues (see :func:`queue_report`)."""
    return (await queue_report(amqp_url, management_url, names)).queues
