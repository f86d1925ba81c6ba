"""Shared pieces of the benchmarks: processes, ports, resource readings, latency stats,
and the JSON + table report. Benchmarks print numbers; they assert nothing about time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The load generator uses one key far beyond the default per-key limit: the limiter stays
# on (its cost is part of every request) with a limit no benchmark reaches.
UNLIMITED = {"TALLY_RATE_LIMIT_PER_SECOND": "1000000000", "TALLY_RATE_LIMIT_BURST": "1000000000"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


@dataclass
class Process:
    """A tally process started for a benchmark, with its resource usage readable."""

    popen: subprocess.Popen
    log: Path
    port: int | None = None

    def pids(self) -> list[int]:
        """The process and its descendants (a `tally consume` of several processes has children)."""
        found, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError):
                    todo += [int(child) for child in (task / "children").read_text().split()]
        return found

    def cpu_seconds(self) -> float:
        """CPU time of the process and its live descendants."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / CLOCK_TICKS

    def peak_rss_mb(self) -> float:
        """Each live process's peak resident memory (its own and its descendants'), summed: an upper
        bound of the tree's peak, since the peaks need not coincide."""
        total = 0
        for pid in self.pids():
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue
            total += sum(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
        return total / 1024 if total else float("nan")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def start_tally(command: str, env: dict[str, str], log: Path, port: int | None = None, tree: Path = ROOT) -> Process:
    """``tally <command>`` from the source tree ``tree`` (another version's checkout: bench/trees.py)."""
    full_env = {**os.environ, "TALLY_LOG_LEVEL": "WARNING", "TALLY_LOG_FORMAT": "json", "PYTHONPATH": str(tree), **env}
    handle = log.open("wb")
    popen = subprocess.Popen(
        [sys.executable, "-m", "service.cli", command], env=full_env, stdout=handle, stderr=subprocess.STDOUT, cwd=tree
    )
    return Process(popen, log, port)


async def wait_ready(url: str, process: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise RuntimeError(f"process exited: {process.log.read_text()[-2000:]}")
            try:
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s: {process.log.read_text()[-2000:]}")


@dataclass
class Rate:
    """Requests (or events) per second with latency percentiles in milliseconds."""

    per_second: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        out = {
            "per_second": round(self.per_second, 1),
            "p50_ms": _r(self.p50_ms),
            "p99_ms": _r(self.p99_ms),
            "errors": self.errors,
        }
        out.update(self.extra)
        return out


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def closed_loop(
    work: Callable[[], Awaitable[None]], *, concurrency: int, duration: float, warmup: float = 1.0
) -> Rate:
    """Run ``work`` from ``concurrency`` tasks back to back for ``duration`` seconds."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + warmup + duration
    measure_from = time.perf_counter() + warmup

    async def worker() -> None:
        nonlocal errors
        while (now := time.perf_counter()) < stop_at:
            try:
                await work()
            except Exception:  # a benchmark counts failures; it does not stop on them
                errors += 1
                continue
            if now >= measure_from:
                latencies.append((time.perf_counter() - now) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Rate(len(latencies) / duration, percentile(latencies, 50), percentile(latencies, 99), errors)


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
        return "-" if value is None else str(value)

    table = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def write_json(path: str | None, document: dict[str, object]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(document, indent=2, default=str))
        print(f"\nJSON written to {path}")


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)} if values else {}
