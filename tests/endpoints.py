"""A real HTTP server for tests (aiohttp in a thread) that plays the endpoints of the
HTTP channels: its answers are scripted per path, and it records every request."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from aiohttp import web

from tests.smtp import free_port

#: What the server does with one request to a path (the script's last step repeats):
#:   ok: 200;  "<status>": that status (500, 400, 410, ...);
#:   "429:<s>": 429 with Retry-After <s>;  "slow:<s>": 200 after <s> seconds
STEPS = ("ok", "500", "410", "400", "429:<s>", "slow:<s>")


@dataclass(frozen=True)
class Received:
    """One request the server answered."""

    path: str
    key: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float = field(default_factory=time.time)


def by_path(path: str, body: bytes) -> str:
    return path


def by_recipient(path: str, body: bytes) -> str:
    """The ``To`` of a form-encoded request (an SMS API's recipient)."""
    return parse_qs(body.decode())["To"][0]


class ScriptedEndpoints:
    """``script`` maps a request's key (its path, "/hooks/a", unless ``key`` says
    otherwise) to its steps, one per request; other keys take ``default``. A 2xx answer is
    JSON with an id, as an SMS API's."""

    def __init__(
        self,
        script: dict[str, list[str]] | None = None,
        key: Callable[[str, bytes], str] = by_path,
        default: tuple[str, ...] = ("ok",),
    ) -> None:
        self.script = dict(script or {})
        self._key = key
        self._default = list(default)
        self.port = free_port()
        self.received: list[Received] = []
        self.attempts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def accepted(self, key: str | None = None) -> list[Received]:
        """The requests answered 2xx (with ``key``, or any)."""
        with self._lock:
            return [
                r for r in self.received if 200 <= r.status < 300 and (key is None or r.key == key)
            ]

    def __enter__(self) -> ScriptedEndpoints:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the test endpoint server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = self._key(request.path, body)
        with self._lock:
            steps = self.script.get(key, self._default)
            step = steps[min(self.attempts[key], len(steps) - 1)]
            self.attempts[key] += 1
        kind, _, arg = step.partition(":")
        headers: dict[str, str] = {}
        if kind == "slow":
            await asyncio.sleep(float(arg))
            status = 200
        elif kind == "ok":
            status = 200
        else:
            status = int(kind)
            if arg:
                headers["Retry-After"] = arg
        with self._lock:
            self.received.append(Received(request.path, key, dict(request.headers), body, status))
        if 200 <= status < 300:
            answer = {"sid": f"SM{uuid.uuid4().hex}", "status": "queued"}
            return web.json_response(answer, status=status, headers=headers)
        return web.Response(status=status, text=f"{status} {step}", headers=headers)


def endpoint_server(
    script: dict[str, list[str]] | None = None, key: Callable[[str, bytes], str] = by_path
) -> Iterator[ScriptedEndpoints]:
    """A started server for a fixture (stopped afterwards)."""
    with ScriptedEndpoints(script, key) as server:
        yield server
