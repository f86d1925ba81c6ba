"""Per-key rate limiting: a token bucket per API key, in each API process.

Each key may burst ``burst`` requests and is refilled at ``rate`` per second. The limit is
per process: with N API replicas a key's effective limit is up to N times higher, which
keeps the check free of any shared state on the hot path. Responses carry the IETF
RateLimit headers (draft-ietf-httpapi-ratelimit-headers): ``RateLimit-Policy`` (quota and
window) and ``RateLimit`` (remaining and seconds until a full bucket); a refused request
is 429 with ``Retry-After``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

POLICY = "per-key"
MAX_BUCKETS = 100_000


@dataclass
class Decision:
    allowed: bool
    remaining: int
    reset_seconds: int  # until the bucket is full again
    retry_after: int  # until one request is allowed (0 if allowed now)


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @property
    def window(self) -> int:
        """Seconds to refill a whole burst: the policy's window."""
        return max(1, math.ceil(self.burst / self.rate))

    def take(self, key: str, now: float | None = None) -> Decision:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        if len(self._buckets) >= MAX_BUCKETS and key not in self._buckets:
            self._buckets.clear()  # bounded memory; forgetting buckets only forgives
        self._buckets[key] = (tokens, now)
        return Decision(
            allowed=allowed,
            remaining=int(tokens),
            reset_seconds=math.ceil((self.burst - tokens) / self.rate),
            retry_after=0 if allowed else max(1, math.ceil((1 - tokens) / self.rate)),
        )

    def headers(self, decision: Decision) -> dict[str, str]:
        return {
            "RateLimit-Policy": f'"{POLICY}";q={self.burst};w={self.window}',
            "RateLimit": f'"{POLICY}";r={decision.remaining};t={decision.reset_seconds}',
        }
