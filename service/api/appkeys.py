"""Typed application keys: every resource an app holds, in one place."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from consumers.publisher import Publisher
from service.api.keycache import KeyCache
from service.api.ratelimit import RateLimiter
from service.query import CursorCodec
from service.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
READ_POOL = web.AppKey("read_pool", asyncpg.Pool)
CURSORS = web.AppKey("cursors", CursorCodec)
OPENAPI = web.AppKey("openapi", dict)
PUBLISHER = web.AppKey("publisher", Publisher)
KEY_CACHE = web.AppKey("key_cache", KeyCache)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
IP_RATE_LIMITER = web.AppKey("ip_rate_limiter", RateLimiter)
