"""The aiohttp base both processes share: server, middlewares, health and metrics."""
