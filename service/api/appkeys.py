"""Typed application keys of the API's resources (the shared ones, settings and the primary
pool, are service/web/appkeys.py's and re-exported here)."""

from __future__ import annotations

from aiohttp import web

from service.api.changewatch import ChangeWatch, StreamSlots
from service.api.fairness import Replicas
from service.api.keycache import KeyCache
from service.api.ratelimit import RateLimiter
from service.api.readcache import ReadCache
from service.domain.listing import CursorCodec
from service.infra.publisher import Publisher
from service.web.appkeys import POOL, READINESS_CHECKS, SETTINGS

__all__ = [
    "POOL",
    "READINESS_CHECKS",
    "SETTINGS",
    "CURSORS",
    "OPENAPI",
    "PUBLISHER",
    "KEY_CACHE",
    "RATE_LIMITER",
    "IP_RATE_LIMITER",
    "REPLICAS",
    "CHANGE_WATCH",
    "READ_CACHE",
    "CHANGE_STREAMS",
]

CURSORS = web.AppKey("cursors", CursorCodec)
OPENAPI = web.AppKey("openapi", dict)
PUBLISHER = web.AppKey("publisher", Publisher)
KEY_CACHE = web.AppKey("key_cache", KeyCache)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
IP_RATE_LIMITER = web.AppKey("ip_rate_limiter", RateLimiter)
REPLICAS = web.AppKey("replicas", Replicas)
CHANGE_WATCH = web.AppKey("change_watch", ChangeWatch)
READ_CACHE = web.AppKey("read_cache", ReadCache)
CHANGE_STREAMS = web.AppKey("change_streams", StreamSlots)
