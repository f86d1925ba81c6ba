"""Fairness benchmark: a victim organization's retrieve and list latency (p50/p99), alone and
while an attacker organization on the same API process runs each of a hostile probe's attacks.

    python bench/fairness.py [--attacker 300000] [--victim 20000] [--duration 10] [--standby]
                             [--json bench/results/fairness.json]

The attacks (each from its own process, --abusers concurrent clients, over several of the
attacker's keys so that the per-key request rate is not what stops it):

- bodies: requests that end in a 400 or 413 after the server read and parsed them — a Respan
  list filter of ~514 KB whose last condition has a bogus operator, a 1,000-event POST
  /v1/events whose last event is bad, a 150 KB number in a filter;
- aggregates: the most expensive Respan filter on aggregate columns the bounds allow
  (MAX_CONDITIONS conditions sharing MAX_FILTER_VALUES values; anything larger is a 400),
  counting the whole match on every page;
- timeouts: with a read standby (--standby: deploy/local/replica.sh is brought up and down
  again) and TALLY_DB_COMMAND_TIMEOUT=2, slow filters running into the statement timeout;
- bad keys: a flood of requests with keys that do not exist, from the victim's own address;
- offset, budget share: the earlier probe's database-share attacks (deep OFFSET pages and
  the period-budget filter), kept so that their figures stay in the same run.

The victim sends an open-loop stream (--victim-rate requests per second: three retrieves to one
first page sorted by -total_cost), each latency measured from when it was due, so that a
stalled server cannot hide behind fewer samples. The victim is already active when an attack
starts, and is measured from ABUSE_LEAD seconds into it, once the attack is in full effect.
Each scenario runs against tally with its defaults and, as the same run's baseline, with cost
shares off (TALLY_ORG_SHARE_SECONDS=0): the ratios are to the victim alone on the default API.

The dataset (database ``tally_bench_fairness``: the attacker's and the victim's organizations)
is loaded once and reused while its size matches.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    ROOT,
    free_port,
    machine,
    percentile,
    print_table,
    start_tally,
    wait_ready,
    with_database,
    write_json,
)
from bench.read import load, settle  # noqa: E402
from service.domain.listing import MAX_CONDITIONS, MAX_FILTER_VALUES  # noqa: E402
from service.store import auth  # noqa: E402

DATABASE = "tally_bench_fairness"
ATTACKER, VICTIM = "bench-attacker", "bench-victim"
# An attack starts this long before the victim is measured, so that it is in full effect.
ABUSE_LEAD = 3.0
KEYS_ENV = "TALLY_BENCH_KEYS"
ATTACKER_KEYS = 8
RESPAN_LIST = "/compat/respan/api/users/list/"
AGGREGATES = ("total_cost", "number_of_requests", "total_tokens", "total_prompt_tokens", "active_days")


# ---- the attacks (run in child processes) ----------------------------------------------------


def _bogus_filter_body(size: int) -> bytes:
    """A Respan filter body of about ``size`` bytes whose last condition is invalid."""
    conditions, values = [], 0
    while values * 12 < size:
        conditions.append({"operator": "in", "value": [f"user_{i}" for i in range(values, values + 1000)]})
        values += 1000
    conditions[-1] = {"operator": "bogus", "value": ["x"]}
    return orjson.dumps({"filters": {"customer_identifier": conditions}})


def _bad_events(organization: str) -> bytes:
    now = datetime.now(UTC)
    events = [
        {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": "probe",
            "type": "usage.recorded",
            "time": (now - timedelta(seconds=1)).isoformat(),
            "subject": f"user_{i}",
            "organization": organization,
            "data": {"requests": 1, "prompt_tokens": 10, "completion_tokens": 5, "cost": "0.001"},
        }
        for i in range(1000)
    ]
    events[-1]["data"]["requests"] = -1
    return orjson.dumps(events)


def _aggregate_storm_body(values: int, conditions: int) -> bytes:
    """The costliest aggregate filter within the bounds: ``conditions`` conditions on aggregate
    columns sharing ``values`` values (so that every one of them is evaluated), matching many rows."""
    per = max(1, values // conditions)
    found: dict[str, list[dict]] = {}
    for i in range(conditions):
        field = AGGREGATES[i % len(AGGREGATES)]
        found.setdefault(field, []).append({"operator": "not_in", "value": [i * per + k for k in range(per)]})
    return orjson.dumps({"filters": found})


def requests_for(attack: str, organization: str, values: int, conditions: int) -> list[tuple[str, str, bytes, str]]:
    """(method, path, body, key kind) the attack cycles through."""
    if attack == "bodies":
        return [
            ("POST", RESPAN_LIST + "?page_size=50", _bogus_filter_body(514_000), "read"),
            ("POST", "/v1/events", _bad_events(organization), "write"),
            ("GET", "/v1/customers?total_cost_gte=" + "9" * 150_000, b"", "read"),
        ]
    if attack in ("aggregates", "timeouts"):
        body = _aggregate_storm_body(values, conditions)
        return [("POST", RESPAN_LIST + "?page_size=50&sort_by=-total_cost", body, "read")]
    if attack == "badkeys":
        return [("GET", "/v1/customers?limit=1", b"", "bad")]
    if attack == "offset":
        return [("GET", "/v1/customers?offset=290000&limit=1000", b"", "read")]
    if attack == "budget":
        return [("GET", "/v1/customers?period_budget_share_gte=0&limit=10", b"", "read")]
    raise ValueError(attack)


async def abuse(base: str, attack: str, concurrency: int, duration: float, args: argparse.Namespace) -> dict:
    keys = orjson.loads(os.environ[KEYS_ENV])
    plan = requests_for(attack, ATTACKER, args.values, args.conditions)
    statuses: Counter[str] = Counter()
    stop_at = time.perf_counter() + duration
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def client(n: int) -> None:
            i = n
            while time.perf_counter() < stop_at:
                method, path, body, kind = plan[i % len(plan)]
                i += 1
                if kind == "bad":
                    key = f"tly_{random.getrandbits(48):012x}.{uuid.uuid4().hex}"
                else:
                    key = keys[kind][i % len(keys[kind])]
                headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
                try:
                    async with session.request(method, base + path, data=body or None, headers=headers) as r:
                        await r.read()
                        statuses[str(r.status)] += 1
                except (TimeoutError, aiohttp.ClientError) as exc:
                    statuses[type(exc).__name__] += 1

        await asyncio.gather(*(client(n) for n in range(concurrency)))
    return {"statuses": dict(statuses)}


async def abusing(base: str, attack: str, args: argparse.Namespace, keys: dict) -> asyncio.subprocess.Process:
    """Start :func:`abuse` in a child process (this file with ``--abuse``); it prints JSON."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--abuse",
        base,
        "--attack",
        attack,
        "--abusers",
        str(args.abusers),
        "--duration",
        str(ABUSE_LEAD + args.duration),
        "--values",
        str(args.values),
        "--conditions",
        str(args.conditions),
        env={**os.environ, KEYS_ENV: orjson.dumps(keys).decode()},
        stdout=asyncio.subprocess.PIPE,
    )


# ---- the victim -------------------------------------------------------------------------------


async def victim(
    base: str, key: str, identifier: str, rate: float, duration: float, lead: float = 0.0
) -> dict[str, dict]:
    """Open loop: retrieves at ``rate`` per second and first pages at a third of it, each
    latency measured from when the request was due; for ``lead + duration`` seconds, of which
    only the last ``duration`` are measured (the victim is a tenant already active when an
    attack starts, measured once the attack is in full effect)."""
    latencies: dict[str, list[float]] = {"retrieve": [], "list": []}
    errors: Counter[str] = Counter()
    paths = {"retrieve": f"/v1/customers/{identifier}", "list": "/v1/customers?sort_by=-total_cost&limit=50"}
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:

        async def one(kind: str, due: float, measured: bool) -> None:
            try:
                async with session.get(base + paths[kind]) as r:
                    await r.read()
                    if r.status != 200:
                        if measured:
                            errors[f"{kind} {r.status}"] += 1
                        return
            except (TimeoutError, aiohttp.ClientError) as exc:
                if measured:
                    errors[f"{kind} {type(exc).__name__}"] += 1
                return
            if measured:
                latencies[kind].append((time.perf_counter() - due) * 1000)

        tasks = []
        start = time.perf_counter()
        interval = 1 / rate
        n = 0
        while (due := start + n * interval) < start + lead + duration:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one("list" if n % 4 == 3 else "retrieve", due, due >= start + lead)))
            n += 1
        await asyncio.gather(*tasks)
    out = {
        kind: {
            "count": len(values),
            "p50_ms": round(percentile(values, 50), 2),
            "p99_ms": round(percentile(values, 99), 2),
        }
        for kind, values in latencies.items()
    }
    out["errors"] = dict(errors)
    return out


# ---- the run ----------------------------------------------------------------------------------


def replica(command: str) -> None:
    subprocess.run(["bash", str(ROOT / "deploy/local/replica.sh"), command], check=True, cwd="/")


def shed(statuses: dict[str, int]) -> dict[str, int]:
    """The attacker's answers: served (2xx), refused as invalid (400/413), shed (429/503)."""
    out = Counter()
    for status, n in statuses.items():
        if status.isdigit() and 200 <= int(status) < 300:
            out["2xx"] += n
        elif status in ("400", "413", "429", "503", "401", "403"):
            out[status] += n
        else:
            out["other"] += n
    return dict(out)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacker", type=int, default=300_000, help="the attacker organization's customers")
    parser.add_argument("--victim", type=int, default=20_000, help="the victim organization's customers")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds the victim is measured per scenario")
    parser.add_argument("--victim-rate", type=float, default=60.0, help="the victim's requests per second")
    parser.add_argument("--abusers", type=int, default=32, help="the attacker's concurrent clients")
    parser.add_argument(
        "--values", type=int, default=MAX_FILTER_VALUES, help="values in the aggregate storm's filter (the bound)"
    )
    parser.add_argument(
        "--conditions", type=int, default=MAX_CONDITIONS, help="conditions in the aggregate storm's filter (the bound)"
    )
    parser.add_argument("--attacks", default="bodies,aggregates,timeouts,badkeys,offset,budget")
    parser.add_argument("--standby", action="store_true", help="bring up deploy/local/replica.sh for 'timeouts'")
    parser.add_argument("--database", default=DATABASE)
    parser.add_argument("--dsn", default=os.environ.get("TALLY_DATABASE_URL", "postgresql://127.0.0.1:5432/tally"))
    parser.add_argument("--reload", action="store_true", help="drop and reload the dataset")
    parser.add_argument("--only-default", action="store_true", help="skip the shares-off configuration")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--abuse", help=argparse.SUPPRESS)  # child mode: the API's base URL
    parser.add_argument("--attack", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.abuse:
        print(orjson.dumps(await abuse(args.abuse, args.attack, args.abusers, args.duration, args)).decode())
        return 0

    total = args.attacker + args.victim
    shares = ((ATTACKER, args.attacker / total), (VICTIM, args.victim / total))
    await load(args.dsn, total, args.reload, database=args.database, shares=shares)
    dsn = with_database(args.dsn, args.database)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        keys = {
            "read": [
                (await auth.create_key(conn, ATTACKER, ("read",), name="attack")).key for _ in range(ATTACKER_KEYS)
            ],
            "write": [(await auth.create_key(conn, ATTACKER, ("write",), name="attack")).key for _ in range(4)],
        }
        victim_key = (await auth.create_key(conn, VICTIM, ("read",), name="victim")).key
        identifier = await conn.fetchval(
            "SELECT customer_identifier FROM customer_rows c JOIN organizations o ON o.id = c.organization_id"
            " WHERE o.name = $1 ORDER BY c.total_cost DESC LIMIT 1",
            VICTIM,
        )
    attacks = [a for a in args.attacks.split(",") if a and (a != "timeouts" or args.standby)]
    configs = {"default": {}, "shares off": {"TALLY_ORG_SHARE_SECONDS": "0"}}
    if args.only_default:
        del configs["shares off"]
    results: dict[str, dict[str, object]] = {}
    peak_rss = 0.0
    standby_up = False
    try:
        if args.standby and "timeouts" in attacks:
            replica("up")
            standby_up = True
        for config, overrides in configs.items():
            for scenario in ["alone", *attacks]:
                env = {
                    "TALLY_DATABASE_URL": dsn,
                    "TALLY_HTTP_HOST": "127.0.0.1",
                    **overrides,
                }
                if scenario == "timeouts":
                    env.update(
                        TALLY_DATABASE_READ_URL=with_database("postgresql://127.0.0.1:5433/", args.database),
                        TALLY_DB_COMMAND_TIMEOUT="2",
                    )
                port = free_port()
                env["TALLY_HTTP_PORT"] = str(port)
                base = f"http://127.0.0.1:{port}"
                api = start_tally("api", env, Path(tempfile.mkdtemp()) / "api.log", port)
                try:
                    await wait_ready(f"{base}/readyz", api)
                    await settle(pool)
                    # The victim is active before the attack starts and throughout; it is measured
                    # once the attack has run ABUSE_LEAD seconds.
                    stream = asyncio.ensure_future(
                        victim(base, victim_key, identifier, args.victim_rate, args.duration, lead=1 + ABUSE_LEAD)
                    )
                    await asyncio.sleep(1)  # the victim's stream under way, as a tenant already active
                    child = await abusing(base, scenario, args, keys) if scenario != "alone" else None
                    measured = await stream
                    entry: dict[str, object] = {"victim": measured}
                    if child is not None:
                        out, _ = await child.communicate()
                        entry["attacker"] = shed(orjson.loads(out)["statuses"])
                    results[f"{config}: {scenario}"] = entry
                    print(f"  {config}: {scenario}: {entry}", file=sys.stderr)
                    peak_rss = max(peak_rss, api.peak_rss_mb())
                finally:
                    api.stop()
    finally:
        await pool.close()
        if standby_up:
            replica("down")

    alone = results["default: alone"]["victim"]
    rows = []
    for name, entry in results.items():
        v = entry["victim"]
        ratios = {}
        for kind in ("retrieve", "list"):
            base_p99 = alone[kind]["p99_ms"]
            ratios[kind] = round(v[kind]["p99_ms"] / base_p99, 2) if base_p99 else None
        entry["p99_over_alone"] = ratios
        a = entry.get("attacker", {})
        rows.append(
            [
                name,
                v["retrieve"]["p50_ms"],
                v["retrieve"]["p99_ms"],
                ratios["retrieve"],
                v["list"]["p50_ms"],
                v["list"]["p99_ms"],
                ratios["list"],
                sum(v["errors"].values()),
                a.get("2xx"),
                (a.get("400", 0) + a.get("413", 0)) if a else None,
                (a.get("429", 0) + a.get("503", 0)) if a else None,
                (a.get("401", 0) + a.get("403", 0) + a.get("other", 0)) if a else None,
            ]
        )
    document = {
        "benchmark": "fairness",
        "attacker_customers": args.attacker,
        "victim_customers": args.victim,
        "duration_s": args.duration,
        "victim_rate": args.victim_rate,
        "abusers": args.abusers,
        "machine": machine(),
        "scenarios": results,
        "api_peak_rss_mb": round(peak_rss, 1),
    }
    print_table(
        f"Fairness: the victim's latency while the attacker ({args.attacker:,} customers, {args.abusers} clients) "
        f"attacks; victim {args.victim:,} customers, {args.victim_rate:g} req/s open loop, {args.duration:g} s each",
        [
            "scenario",
            "retrieve p50",
            "p99 ms",
            "p99/alone",
            "list p50",
            "p99 ms",
            "p99/alone",
            "victim errors",
            "A 2xx",
            "A 400/413",
            "A 429/503",
            "A other",
        ],
        rows,
    )
    write_json(args.json, document)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
