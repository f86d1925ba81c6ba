"""Rate limiting: a token bucket per API key (and, for requests no key vouches for, per
client IP), in each API process.

Each key may burst ``burst`` requests and is refilled at ``rate`` per second. Across API
replicas the limit holds in all: each process enforces its part, ``rate`` and ``burst``
divided by the number of live replicas (service/api/fairness.py ``Replicas``) — exact when a
load balancer spreads a key's requests evenly, never more than the limit otherwise, and no
shared state on the hot path. Responses carry the IETF
RateLimit headers (draft-ietf-httpapi-ratelimit-headers): ``RateLimit-Policy`` (quota and
window) and ``RateLimit`` (remaining and seconds until a full bucket); a refused request
is 429 with ``Retry-After``.

The per-IP bucket (policy ``per-ip``) is charged by public routes and by requests whose key
fails authentication; a request that would need a database lookup to authenticate is
refused while its IP's bucket is empty, so guessing keys costs the database nothing. Behind
a reverse proxy every client shares the proxy's address: size the bucket for that.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from service.api.fairness import Replicas

MAX_BUCKETS = 100_000


@dataclass
class Decision:
    allowed: bool
    remaining: int
    reset_seconds: int  # until the bucket is full again
    retry_after: int  # until one request is allowed (0 if allowed now)


class RateLimiter:
    def __init__(self, rate: float, burst: int, policy: str = "per-key", replicas: Replicas | None = None) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.policy = policy
        self.replicas = replicas  # None: the limit is this process's alone (per-address buckets)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    def _share(self) -> tuple[float, float, int]:
        """This process's rate and burst, and how many processes share the limit."""
        n = max(1, self.replicas.count) if self.replicas is not None else 1
        return self.rate / n, max(1.0, self.burst / n), n

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @property
    def window(self) -> int:
        """Seconds to refill a whole burst: the policy's window."""
        return max(1, math.ceil(self.burst / self.rate))

    def take(self, key: str, now: float | None = None) -> Decision:
        """Spend one token of ``key``'s bucket if it has one."""
        now = time.monotonic() if now is None else now
        tokens = self._refilled(key, now)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        if len(self._buckets) >= MAX_BUCKETS and key not in self._buckets:
            self._buckets.clear()  # bounded memory; forgetting buckets only forgives
        self._buckets[key] = (tokens, now)
        return self._decision(allowed, tokens)

    def peek(self, key: str, now: float | None = None) -> Decision:
        """Whether ``key``'s bucket has a token, spending none."""
        tokens = self._refilled(key, time.monotonic() if now is None else now)
        return self._decision(tokens >= 1, tokens)

    def _refilled(self, key: str, now: float) -> float:
        rate, burst, _ = self._share()
        tokens, last = self._buckets.get(key, (burst, now))
        return min(burst, tokens + (now - last) * rate)

    def _decision(self, allowed: bool, tokens: float) -> Decision:
        rate, burst, n = self._share()
        return Decision(
            allowed=allowed,
            remaining=int(tokens * n),  # this process's part, as a share of the whole
            reset_seconds=math.ceil((burst - tokens) / rate),
            retry_after=0 if allowed else max(1, math.ceil((1 - tokens) / rate)),
        )

    def headers(self, decision: Decision) -> dict[str, str]:
        return {
            "RateLimit-Policy": f'"{self.policy}";q={self.burst};w={self.window}',
            "RateLimit": f'"{self.policy}";r={decision.remaining};t={decision.reset_seconds}',
        }
