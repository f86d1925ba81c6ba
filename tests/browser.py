"""A real headless browser for the docs tests: Debian's chromium, driven over the Chrome
DevTools Protocol (a websocket, with aiohttp: no browser-automation package to install). No
fixtures here: those live in the test modules."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No background networking (this machine's network is closed), a fresh profile, no sandbox
# (CI runs as root).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class Page:
    """One tab, addressed by its session on the browser's websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str, ids: itertools.count[int]) -> None:
        self.ws, self.session_id, self.ids = ws, session_id, ids

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await _call(self.ws, self.ids, method, params, self.session_id)

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The value of a JavaScript expression (a promise is awaited); an exception thrown in
        the page fails here with its message."""
        result = await asyncio.wait_for(
            self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}),
            timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")


async def _call(
    ws: aiohttp.ClientWebSocketResponse,
    ids: itertools.count[int],
    method: str,
    params: dict[str, Any] | None = None,
    session_id: str | None = None,
) -> dict[str, Any]:
    """Send one command and return its result, skipping the events that arrive meanwhile
    (commands are sent one at a time, so the next reply with our id is ours)."""
    call_id = next(ids)
    message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
    if session_id:
        message["sessionId"] = session_id
    await ws.send_str(json.dumps(message))
    while True:
        reply = json.loads(await ws.receive_str())
        if reply.get("id") == call_id:
            if "error" in reply:
                raise AssertionError(f"{method}: {reply['error']}")
            result: dict[str, Any] = reply["result"]
            return result


@asynccontextmanager
async def browser_page() -> AsyncIterator[Page]:
    """A blank page in a fresh headless chromium, closed (with its profile) afterwards."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stderr is not None
            url = None
            while url is None:
                line = await asyncio.wait_for(process.stderr.readline(), 60)
                assert line, "chromium exited before it listened for DevTools"
                found = LISTENING.search(line)
                url = found.group(1).decode() if found else None
            # Keep reading what chromium writes, so that a full pipe never blocks it.
            drain = asyncio.create_task(process.stderr.read())
            async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
                ids = itertools.count(1)
                target = await _call(ws, ids, "Target.createTarget", {"url": "about:blank"})
                attached = await _call(
                    ws, ids, "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
                )
                page = Page(ws, attached["sessionId"], ids)
                await page.send("Page.enable")
                await page.send("Runtime.enable")
                yield page
            drain.cancel()
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()
