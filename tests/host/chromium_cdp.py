"""A small Chrome DevTools Protocol client: headless Chromium driven over its debugging websocket (aiohttp, which
ComfyUI already needs), for testing the pack's front end against a real ComfyUI server."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile

import aiohttp

from comfy_server import stop_process_group

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "--window-size=1600,1000"]


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """``async with Chromium() as page: await page.evaluate(...)``: one page of a fresh headless browser."""

    def __init__(self, executable: str, start_timeout: float = 60.0):
        self.executable = executable
        self.start_timeout = start_timeout
        self.errors: list[str] = []  # console errors, uncaught exceptions and failed loads, as text
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}

    async def __aenter__(self) -> "Chromium":
        self._profile = tempfile.mkdtemp(prefix="finextract-chromium-")
        self._process = subprocess.Popen([self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile}",
                                          "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        port = await self._debugging_port()
        self._session = aiohttp.ClientSession()
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as response:
            page = next(t for t in await response.json(content_type=None) if t["type"] == "page")
        self._socket = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Runtime", "Log", "Page"):
            await self.send(f"{domain}.enable")
        return self

    async def __aexit__(self, *exc) -> None:
        self._reader.cancel()
        await self._socket.close()
        await self._session.close()
        stop_process_group(self._process, timeout=20)
        shutil.rmtree(self._profile, ignore_errors=True)

    async def _debugging_port(self) -> int:
        marker = os.path.join(self._profile, "DevToolsActivePort")  # Chromium writes its port here once listening
        deadline = asyncio.get_running_loop().time() + self.start_timeout
        while asyncio.get_running_loop().time() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.executable} exited with {self._process.returncode} during start-up")
            if os.path.exists(marker):
                with open(marker) as f:
                    first_line = f.readline().strip()
                if first_line:
                    return int(first_line)
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{self.executable} did not open its debugging port within {self.start_timeout} s")

    async def _read(self) -> None:
        async for message in self._socket:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"])
                if "error" in data:
                    future.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
            else:
                self._record_error(data.get("method"), data.get("params", {}))

    def _record_error(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled" and params["type"] == "error":
            text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"])
            frames = params.get("stackTrace", {}).get("callFrames", [])
            self.errors.append(f"console.error: {text} ({frames[0]['url'] if frames else 'no stack'})")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(f"exception: {details.get('exception', {}).get('description', details['text'])} "
                               f"({details.get('url', '')})")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry['text']} ({entry.get('url', '')})")

    async def send(self, method: str, **params) -> dict:
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self._socket.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        return await asyncio.wait_for(future, timeout=120)

    async def evaluate(self, expression: str):
        """The JSON value of a JavaScript expression (awaited if it is a promise); raises on a thrown error."""
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"{expression[:80]}... threw "
                               f"{details.get('exception', {}).get('description', details['text'])}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0):
        """Polls until the expression is truthy and returns its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        raise TimeoutError(f"still false after {timeout} s: {expression}")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def screenshot(self, path: str) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
