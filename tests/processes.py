"""Consumer processes for tests: real `tally consume` subprocesses with their logs, a fleet
that kills every one at teardown, and waits that fail with the processes' log tails (no
fixtures here: those live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
import orjson

from service.infra.settings import Settings
from tests.eventkit import Broker, applied, wait_until
from tests.factories import Org

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TallyProcess:
    """One `tally consume` (or, with ``command``, `tally api` or `tally webhooks`) subprocess;
    its stderr (and stdout) go to a log file."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        broker: Broker,
        log_dir: Path,
        env: dict[str, str],
        command: str = "consume",
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in close())
        port_setting = "TALLY_HTTP_PORT" if command == "api" else "TALLY_CONSUMER_HTTP_PORT"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", command],
            cwd=ROOT,
            env={
                **os.environ,
                "TALLY_DATABASE_URL": settings.database_url,
                "TALLY_AMQP_NAMESPACE": broker.names.namespace,
                port_setting: str(self.port),
                "TALLY_HTTP_HOST": "127.0.0.1",
                "TALLY_BATCH_MAX_WAIT": "0.02",
                "TALLY_LOG_FORMAT": "json",
                # One process per `tally consume` unless a test asks for more: tests count
                # consumers on the queue and kill processes by the one they started.
                "TALLY_CONSUMER_PROCESSES": "1",
                **env,
            },
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        return f"--- {self.name} (pid {self.proc.pid}, rc {self.proc.poll()}) log tail ---\n" + "\n".join(
            self.log_text().splitlines()[-lines:]
        )

    def log_entries(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                entry = {"level": "raw", "message": line}
            out.append(entry if isinstance(entry, dict) else {"level": "raw", "message": line})
        return out

    def worker_pids(self) -> list[int]:
        """The pids of the processes a `tally consume` of several started (from its log)."""
        for entry in self.log_entries():
            if entry.get("message") == "consumer processes started":
                return list(entry["pids"])
        raise AssertionError(f"{self.name} logged no 'consumer processes started'\n{self.tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        assert self.alive(), f"{self.name} exited unexpectedly\n{self.tail()}"

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        async def ready() -> bool:
            self.check_alive()
            try:
                async with session.get(self.url + "/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        try:
            await wait_until(ready, timeout=timeout, what=f"{self.name} /readyz 200")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait (bounded) for the exit; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            await wait_until(self._exited, timeout=timeout, interval=0.05, what=f"{self.name} exit after SIGTERM")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no drain, no ack, no clean disconnect."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    async def _exited(self) -> bool:
        return self.proc.poll() is not None

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._log.close()

    def deadlock_lines(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if "deadlock" in line.lower()]

    def assert_no_errors(self) -> None:
        """No error or critical log line, and no deadlock mentioned anywhere."""
        bad = [e for e in self.log_entries() if e.get("level") in ("error", "critical")]
        assert not bad, f"{self.name} logged errors: {bad}\n{self.tail()}"
        assert not self.deadlock_lines(), f"{self.name} hit a deadlock\n" + "\n".join(self.deadlock_lines())


class Fleet:
    """Consumer processes started by one test; every one is killed at teardown."""

    def __init__(self, settings: Settings, broker: Broker, log_dir: Path) -> None:
        self.settings, self.broker, self.log_dir = settings, broker, log_dir
        self.processes: list[TallyProcess] = []

    def start(self, name: str, command: str = "consume", **env: str) -> TallyProcess:
        p = TallyProcess(
            name, self.settings, self.broker, self.log_dir, {k.upper(): v for k, v in env.items()}, command
        )
        self.processes.append(p)
        return p

    def tails(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def close(self) -> None:
        for p in self.processes:
            p.close()


async def wait_applied(pool: asyncpg.Pool, orgs: list[Org], n: int, fleet: Fleet, timeout: float = 60.0) -> None:
    async def done() -> bool:
        for p in fleet.processes:
            if p.proc.returncode is None and p.proc.poll() is not None:
                raise AssertionError(f"consumer {p.name} died\n{p.tail()}")
        return await applied(pool, orgs) >= n

    try:
        await wait_until(done, timeout=timeout, what=f"{n} events applied")
    except AssertionError as exc:
        raise AssertionError(f"{exc} (applied {await applied(pool, orgs)})\n{fleet.tails()}") from None


async def wait_drained(broker: Broker, fleet: Fleet, timeout: float = 30.0) -> None:
    async def empty() -> bool:
        return await broker.queue_depth(broker.names.ingest) == 0

    try:
        await wait_until(empty, timeout=timeout, what="ingest queue empty")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{fleet.tails()}") from None


async def terminate_all(fleet: Fleet, processes: list[TallyProcess], timeout: float = 30.0) -> None:
    for p in processes:
        p.proc.send_signal(signal.SIGTERM)
    for p in processes:
        try:
            await wait_until(p._exited, timeout=timeout, what=f"{p.name} exit after SIGTERM")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{fleet.tails()}") from None
        assert p.proc.returncode == 0, f"{p.name} exited {p.proc.returncode} on SIGTERM\n{p.tail()}"
