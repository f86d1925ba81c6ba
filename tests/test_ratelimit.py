"""Per-key rate limiting: the bucket itself, and 429s through the real app."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer

from service.api.app import create_app
from service.api.ratelimit import RateLimiter
from tests.factories import Org


def test_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    limiter = RateLimiter(rate=2, burst=3)
    assert [limiter.take("k", now=100.0).allowed for _ in range(4)] == [True, True, True, False]
    refused = limiter.take("k", now=100.0)
    assert refused.retry_after == 1 and refused.remaining == 0
    assert limiter.take("k", now=100.5).allowed  # half a second refills one token at 2/s
    assert not limiter.take("k", now=100.5).allowed
    assert limiter.take("other", now=100.5).allowed  # buckets are per key
    assert limiter.headers(limiter.take("fresh", now=0.0)) == {
        "RateLimit-Policy": '"per-key";q=3;w=2',
        "RateLimit": '"per-key";r=2;t=1',
    }


def test_disabled_limiter() -> None:
    assert not RateLimiter(rate=0, burst=10).enabled


async def test_over_limit_requests_get_429_and_other_keys_do_not(settings, migrated, org: Org, other_org: Org) -> None:
    # One replica: the limit is this process's alone (tests/test_replicas.py divides it).
    strict = settings.model_copy(
        update={"rate_limit_per_second": 0.5, "rate_limit_burst": 3, "api_heartbeat_seconds": 0}
    )
    async with TestClient(TestServer(create_app(strict))) as client:
        for remaining in (2, 1, 0):
            r = await client.get("/v1/customers", headers=org.headers())
            assert r.status == 200
            assert r.headers["RateLimit-Policy"] == '"per-key";q=3;w=6'
            assert r.headers["RateLimit"].startswith(f'"per-key";r={remaining};')
        r = await client.get("/v1/customers", headers=org.headers())
        assert r.status == 429 and r.content_type == "application/problem+json"
        assert int(r.headers["Retry-After"]) >= 1 and "RateLimit" in r.headers
        body = await r.json()
        assert body["status"] == 429 and body["type"].endswith("/rate-limited")
        # Errors of a limited key still count and carry the headers.
        r = await client.get("/v1/customers?limit=0", headers=org.headers(org.read_key))
        assert r.status == 400 and "RateLimit" in r.headers
        # Another organization's traffic is unaffected.
        r = await client.get("/v1/customers", headers=other_org.headers())
        assert r.status == 200


def test_peek_spends_nothing_and_policies_are_named() -> None:
    limiter = RateLimiter(rate=1, burst=2, policy="per-ip")
    assert limiter.peek("10.0.0.1", now=0.0).allowed
    assert [limiter.take("10.0.0.1", now=0.0).allowed for _ in range(3)] == [True, True, False]
    refused = limiter.peek("10.0.0.1", now=0.0)
    assert not refused.allowed and refused.retry_after == 1
    assert limiter.peek("10.0.0.1", now=1.0).allowed  # refilled, and peeking took nothing:
    assert limiter.take("10.0.0.1", now=1.0).allowed
    assert limiter.headers(refused)["RateLimit-Policy"] == '"per-ip";q=2;w=2'
