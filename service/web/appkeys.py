"""Typed application keys of what both processes' applications hold (the API's own are in
service/api/appkeys.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
from aiohttp import web

from service.infra.settings import Settings

ReadinessCheck = Callable[[web.Application], Awaitable[None]]

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
# name -> check; /readyz runs each (a check raises when its dependency is not ready).
READINESS_CHECKS = web.AppKey("readiness_checks", dict[str, ReadinessCheck])
