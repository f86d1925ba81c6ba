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
- What only the first process does: its `/readyz` answers for itself (``tally_broker_connected``
  covers every process), its webhook dispatcher wakes at its own commits (the others' are seen
  at its next poll), and its housekeeping relays every process's budget alerts (the others'
  within its 5 s relay period).
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
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from consumers.app import EXIT_CONSUMER_CRASHED

log = logging.getLogger("tally.consumer")

# Seconds the processes get to drain after SIGTERM before they are killed: the consumer's own
# drain grace (consumers/ingest.py), its pool's close, and a margin.
STOP_GRACE = 30.0
_PR_SET_PDEATHSIG = 1
METRICS_PREFIX = "tally-metrics-"


def _remove_stale_metrics() -> None:
    """The metrics directories of supervisors that are gone (killed before they could remove
    their own)."""
    for path in Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*-*"):
        pid = path.name.removeprefix(METRICS_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def supervise(count: int) -> int:
    """Run ``count`` consumer processes until a signal or until one ends; the exit code."""
    _remove_stale_metrics()
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
    # Inherited by every process; an operator's own value is replaced, since files left in it
    # by earlier processes would be summed with this run's.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
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
    deadline = time.monotonic() + STOP_GRACE
    while any(p.exitcode is None for p in processes):
        # The first signal asks for the stop (or comes while one is under way); a second kills.
        late = time.monotonic() > deadline
        if len(signals) >= 2 or late:
            why = "did not stop in time" if late else "a second signal"
            log.error(f"consumer processes killed: {why} (unacked messages are redelivered)")
            for process in processes:
                if process.exitcode is None:
                    process.kill()
            for process in processes:
                process.join(5)
            return code or 1
        wait([p.sentinel for p in processes if p.exitcode is None], timeout=0.2)
    if code == 0:  # stopped on a signal: 0 if every process drained and exited cleanly
        code = next((_stopped(c) for c in (p.exitcode for p in processes) if _stopped(c)), 0)
    return code


def _stopped(exitcode: int | None) -> int:
    """A process's exit code after the supervisor asked it to stop: 0 if it drained, or if the
    SIGTERM came before it had installed its own handler (it was still starting: it held
    nothing to drain); 1 if another signal ended it."""
    if exitcode is None or exitcode == 0 or exitcode == -signal.SIGTERM:
        return 0
    return exitcode if exitcode > 0 else 1


def _tie_to(parent: int) -> None:
    """This process leaves the terminal's process group (Ctrl-C reaches the supervisor, which
    passes it on once) and, on Linux, is killed when the supervisor dies."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed; watching the supervisor instead")
    if os.getppid() != parent:  # the supervisor died before the line above took effect
        os._exit(EXIT_CONSUMER_CRASHED)


def _watch_supervisor(parent: int) -> None:
    """Where the kernel does not kill this process with its supervisor: SIGTERM to itself (a
    drain) within a second of the supervisor's end."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the supervisor is gone; stopping")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="tally-supervisor-watch", daemon=True).start()


def serve_consumer(parent: int) -> None:
    """The first process: the whole consumer, as `tally consume` with one process runs it."""
    _tie_to(parent)
    _watch_supervisor(parent)
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
        metrics.sample_pool(pool)
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
