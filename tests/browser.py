"""Headless Chromium for the UI tests (the ComfyUI node, the WebUI accordion): start it, drive one page
through the DevTools protocol (aiohttp's websocket client), and keep what the page reports as errors.

Standard library at import; aiohttp is imported when a page is opened (it is in ``.comfy``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from typing import Any, AsyncIterator, Iterator

#: The Chromium binary, or None (Debian: ``apt-get install -y chromium``).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
NO_CHROMIUM = "no chromium binary (apt-get install -y chromium)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def chromium(profile: str, url: str = "about:blank", window: str = "1400,900") -> Iterator[int]:
    """Headless Chromium showing ``url``, its profile in the folder ``profile``; yields its DevTools port.

    Terminated (killed if it does not stop) when the block ends.
    """
    if CHROMIUM is None:
        raise RuntimeError(NO_CHROMIUM)
    debug_port = free_port()
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={window}",
            f"--remote-debugging-port={debug_port}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/version", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError("chromium's DevTools endpoint did not come up in 30 s") from None
                time.sleep(0.5)
        yield debug_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Page:
    """The few DevTools-protocol calls the UI tests need, on one page's websocket.

    ``errors`` collects what the page reports while calls are answered: uncaught exceptions,
    ``console.error`` calls and error log entries (failed resource loads, with their URL), once
    the Runtime and Log domains are enabled (``enable_error_reports``).
    """

    def __init__(self, ws: Any, timeout: float = 120) -> None:
        self.ws, self.next_id, self.timeout = ws, 0, timeout
        self.errors: list[str] = []

    async def enable_error_reports(self) -> None:
        for domain in ("Runtime", "Log", "Page"):
            await self.call(f"{domain}.enable")

    def _keep_error(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(params["exceptionDetails"])[:500])
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.errors.append((entry.get("text", "") + " " + entry.get("url", "")).strip()[:500])

    async def call(self, method: str, **params: Any) -> Any:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=self.timeout)
            self._keep_error(msg)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(json.dumps(result["exceptionDetails"])[:2000])
        return result["result"].get("value")

    async def screenshot(self) -> bytes:
        import base64

        shot = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])


@contextlib.asynccontextmanager
async def open_page(debug_port: int, timeout: float = 120) -> AsyncIterator[Page]:
    """The first page of the Chromium listening on ``debug_port``, as a ``Page``."""
    import aiohttp

    targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list", timeout=10).read())
    target = next(t for t in targets if t.get("type") == "page")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            yield Page(ws, timeout)
