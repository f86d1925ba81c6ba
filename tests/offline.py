"""The fast tier's guard: with TALLY_TEST_OFFLINE set (`make test-unit`), any TCP connection to
a local PostgreSQL or RabbitMQ port fails at once, so a test that needs a service and is not
marked as such fails loudly instead of passing as a "unit" test."""

from __future__ import annotations

import socket

# PostgreSQL, a streaming standby, RabbitMQ (AMQP and management), a local RabbitMQ cluster.
SERVICE_PORTS = frozenset({5432, 5433, 5672, 15672, 5681, 5682, 5683})


class ServiceConnectionRefused(OSError):
    pass


def install_offline_guard() -> None:
    original = socket.socket.connect
    original_ex = socket.socket.connect_ex

    def port_of(address: object) -> int | None:
        return address[1] if isinstance(address, tuple) and len(address) >= 2 else None

    def connect(self: socket.socket, address: object) -> None:
        if port_of(address) in SERVICE_PORTS:
            raise ServiceConnectionRefused(f"the fast tier reaches no service (tried port {port_of(address)})")
        original(self, address)  # type: ignore[arg-type]

    def connect_ex(self: socket.socket, address: object) -> int:
        if port_of(address) in SERVICE_PORTS:
            raise ServiceConnectionRefused(f"the fast tier reaches no service (tried port {port_of(address)})")
        return original_ex(self, address)  # type: ignore[arg-type]

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
