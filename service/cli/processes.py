"""`tally consume` with several processes: a supervisor that starts them and stops them together.

A Python process folds on one core at most (the broker's frames, validation and the fold's
encoding are CPU work on its event loop), so one process cannot use a second core however
the database keeps up. The supervisor starts ``TALLY_CONSUMER_PROCESSES`` processes (spawned,
so nothing of its own state is shared), which compete on the ingest queue exactly as separate
`tally consume` processes do: the fold's guarantees already hold between concurrent consumers
(each event's journal row and each customer's row lock), so adding processes changes nothing
they rely on.

- The first process is the whole consumer (consumers/app.py): health, readiness and
  /metrics on ``TALLY_CONSUMER_HTTP_PORT``, housekeeping, the webhook dispatcher and a fold.
  The others only fold (:func:`fold_worker`).
- Metrics: every process writes them to a directory of the supervisor's, and the first
  serves them summed (service/infra/metrics.py, prometheus_client's multiprocess mode).
- One process ending on its own ends them all: the others drain (commit and ack what they
  hold) and the supervisor exits with the failed process's code (70 when it was a fold
  crash; a process that exited 0 unasked counts as one), for the process supervisor to restart
  the whole, as it would one process.
- SIGTERM or SIGINT to the supervisor: each process drains and exits, and so does it; a
  second signal kills them. The processes run in their own process group, so a terminal's
  Ctrl-C reaches only the supervisor, which passes it on once. On Linux each process dies
  with the supervisor (``PR_SET_PDEATHSIG``): `kill -9` of `tally consume` stops every fold,
  as it stops a single process; elsewhere a process that finds its supervisor gone drains
  and exits within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.connection import wait
from typing import Any

log = logging.getLogger("tally.consumer")

# Exit code of a process whose fold crashed (consumers/app.py has the same for one process).
EXIT_CONSUMER_CRASHED = 70
# Seconds the processes get to drain after SIGTERM before they are killed: the consumer's own
# drain grace (consumers/ingest.py), its pool's close, and a margin.
STOP_GRACE = 30.0
_PR_SET_PDEATHSIG = 1


def supervise(count: int) -> int:
    """Run ``count`` consumer processes until a signal or until one ends; the exit code."""
    metrics_dir = tempfile.mkdtemp(prefix="tally-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # inherited by every process
    context = multiprocessing.get_context("spawn")
    parent = os.getpid()
    processes = [context.Process(target=serve_consumer, args=(parent,), name="tally-consume-0")]
    processes += [
        context.Process(target=fold_worker, args=(parent, i), name=f"tally-consume-{i}") for i in range(1, count)
    ]
    signals: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda sig, _frame: signals.append(sig)) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        for process in processes:
            process.start()
        log.info("consumer processes started", extra={"processes": count, "pids": [p.pid for p in processes]})
        return _watch(processes, signals)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in processes:
            if process.pid is not None and process.is_alive():
                process.kill()
                process.join(5)
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _watch(processes: list[Any], signals: list[int]) -> int:
    """Wait for a signal or for a process to end; then stop them all and return the exit code."""
    ended = None
    while not signals and ended is None:
        wait([p.sentinel for p in processes], timeout=0.2)
        ended = next((p for p in processes if p.exitcode is not None), None)
    code = 0
    if ended is not None and not signals:
        code = ended.exitcode if ended.exitcode not in (0, None) else EXIT_CONSUMER_CRASHED
        code = code if code > 0 else EXIT_CONSUMER_CRASHED  # killed by a signal: -N
        log.critical(
            "a consumer process ended; stopping the others",
            extra={"worker": ended.name, "worker_pid": ended.pid, "exitcode": ended.exitcode},
        )
    for process in processes:
        if process.exitcode is None and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    handled = len(signals)
    deadline = time.monotonic() + STOP_GRACE
    while any(p.exitcode is None for p in processes):
        if len(signals) > handled or time.monotonic() > deadline:
            log.error("consumer processes did not stop in time; killing them (unacked messages are redelivered)")
            for process in processes:
                if process.exitcode is None:
                    process.kill()
            for process in processes:
                process.join(5)
            return code or 1
        wait([p.sentinel for p in processes if p.exitcode is None], timeout=0.2)
    if code == 0:  # stopped on a signal: 0 if every process drained and exited cleanly
        code = next((c if c > 0 else 1 for c in (p.exitcode for p in processes) if c), 0)
    return code


def _tie_to(parent: int) -> None:
    """This process leaves the terminal's process group (Ctrl-C reaches the supervisor, which
    passes it on once) and, on Linux, is killed when the supervisor dies."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the supervisor died before the line above took effect
        os._exit(EXIT_CONSUMER_CRASHED)


def serve_consumer(parent: int) -> None:
    """The first process: the whole consumer, as `tally consume` with one process runs it."""
    _tie_to(parent)
    os.environ["TALLY_CONSUMER_PROCESSES"] = "1"
    from service.cli import main

    sys.exit(main(["consume"]))


def fold_worker(parent: int, index: int) -> None:
    """Another process: only the ingest loop, until SIGTERM (or its supervisor is gone)."""
    _tie_to(parent)
    from service.cli.common import run
    from service.infra import logs
    from service.infra.settings import Settings

    settings = Settings()
    logs.configure(settings.log_level, settings.log_format)
    sys.exit(run(_fold(settings, parent, index)))


async def _fold(settings: Any, parent: int, index: int) -> int:
    from consumers.ingest import DRAIN_GRACE, Consumer
    from service.infra import metrics
    from service.infra.db import pool_context

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with pool_context(settings.database_url, settings) as pool:
        metrics.sample(metrics.DB_POOL_IN_USE, lambda: pool.get_size() - pool.get_idle_size())
        metrics.sample(metrics.DB_POOL_SIZE, pool.get_size)
        consumer = Consumer(settings, pool)
        task = asyncio.create_task(consumer.run(), name=f"tally-consumer-{index}")
        stopping = asyncio.create_task(stop.wait())
        while True:  # every second: this process's sampled gauges, and whether its supervisor lives
            done, _ = await asyncio.wait([task, stopping], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            metrics.refresh()
            if done:
                break
            if os.getppid() != parent:
                log.warning("the supervisor is gone; stopping")
                break
        stopping.cancel()
        if task.done():
            if not task.cancelled() and task.exception() is not None:
                log.critical("consumer crashed; exiting", exc_info=task.exception())
                return EXIT_CONSUMER_CRASHED
            return 0
        await consumer.stop()
        try:
            await asyncio.wait_for(task, DRAIN_GRACE + 5)
        except TimeoutError:
            log.error("consumer did not drain in time; unacked messages will be redelivered")
            return 1
    return 0
