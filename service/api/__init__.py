"""The HTTP edge: aiohttp handlers that translate requests into core calls and back."""
