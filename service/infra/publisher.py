"""Publishing events with publisher confirms and mandatory routing (HTTP ingest, demo,
dead-letter replay). Connects lazily; a broker that is down is an Unavailable error."""

from __future__ import annotations

import asyncio
import logging
import os

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from service.infra.broker import BrokerNodes, Names, Topology, declare
from service.infra.errors import Unavailable, is_transient

log = logging.getLogger("tally.publisher")

CONNECT_TIMEOUT = 5.0
CONFIRM_TIMEOUT = 10.0


class Publisher:
    def __init__(self, amqp_url: str, names: Names) -> None:
        self.amqp_url = amqp_url
        self.names = names
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._topology: Topology | None = None
        self._lock = asyncio.Lock()

    @property
    def amqp_url(self) -> str:
        """``TALLY_AMQP_URL``: one broker, or a cluster's nodes separated by commas."""
        return self._amqp_url

    @amqp_url.setter
    def amqp_url(self, value: str) -> None:
        self._amqp_url = value
        self.nodes = BrokerNodes(value)

    @property
    def connected(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    async def topology(self) -> Topology:
        if self.connected and self._topology is not None:
            return self._topology
        async with self._lock:
            if not (self.connected and self._topology is not None):
                await self._close()
                try:
                    self._connection = await self.nodes.connect(
                        timeout=CONNECT_TIMEOUT, connection_name=f"{self.names.namespace}-publisher-{os.getpid()}"
                    )
                    self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
                    self._topology = await declare(self._connection, self._channel, self.names)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    await self._close()
                    raise Unavailable(f"message broker unreachable: {type(exc).__name__}") from exc
            assert self._topology is not None
            return self._topology

    async def publish(self, message: aio_pika.Message, routing_key: str, *, dead_letter: bool = False) -> None:
        """Publish and wait for the broker's confirm; unroutable (mandatory) is an error. The
        message carries the AMQP user it is published as (``user_id``, which the broker
        validates), so a consumer that binds publishers to organizations knows it is tally's."""
        topology = await self.topology()
        channel = self._channel
        exchange = topology.dlx if dead_letter else topology.events
        if message.user_id is None:
            message.user_id = self.nodes.user
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=True, timeout=CONFIRM_TIMEOUT)
        except aio_pika.exceptions.PublishError as exc:  # returned: no queue is bound for it
            raise Unavailable(f"broker did not route the message: {exc}") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            # A negative confirm: the queue did not take the message. The next publish opens a
            # new channel, on the next node: in one run of tests/test_broker_cluster.py (RabbitMQ
            # 3.10) a channel refused every publish for two minutes after the queue's leader
            # had moved.
            await self._reset(channel)
            raise Unavailable(f"broker did not confirm the message: {exc}") from exc
        except Exception as exc:
            if not is_transient(exc):
                raise
            await self._reset(channel)
            raise Unavailable(f"message broker unreachable: {type(exc).__name__}") from exc

    async def close(self) -> None:
        async with self._lock:
            await self._close()

    async def _reset(self, channel: AbstractChannel | None) -> None:
        """Drop the connection a failed publish went out on, unless a concurrent failure
        already replaced it, and connect to the next node first next time."""
        async with self._lock:
            if channel is not None and channel is self._channel:
                await self._close()
                self.nodes.lost()

    async def _close(self) -> None:
        connection, self._connection, self._channel, self._topology = self._connection, None, None, None
        if connection is not None and not connection.is_closed:
            try:
                await asyncio.wait_for(connection.close(), CONNECT_TIMEOUT)
            except Exception as exc:  # closing a broken connection may fail in many ways; it is gone either way
                log.debug("closing publisher connection failed: %r", exc)
