"""`herald bench`'s HTTP runs: the latency of ``POST /api/v1/notifications`` at a fixed
rate, beside a baseline of the same server answering ``GET /healthz`` at the same rate.

The API runs as its own `herald api` process (as in production); the load comes from
this process, open loop: request i is due at start + i/rate whatever became of the
earlier ones, and its latency counts from when it was due, so a stalled server shows
as latency rather than as fewer requests (no coordinated omission). The first five
seconds warm both sides up and are not counted.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import SecretStr

from pipeline.errors import HeraldError
from pipeline.ops.bench import WorkerProcess
from pipeline.settings import Settings

BASELINE = "GET /healthz (the same server, baseline)"
INTAKE = "POST /api/v1/notifications"
_PRODUCER = "bench-http"
#: Offered and not counted first: the API's producer connects, the broker's JIT warms.
_WARM_S = 5.0
#: Connections the load comes over (a request waits for a free one: the latency
#: counts from when it was due, so a short supply would show).
_CONNECTIONS = 64


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ApiProcess(WorkerProcess):
    """A `herald api` subprocess serving ``settings``; ``url`` once it is ready."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.token = secrets.token_urlsafe(24)
        port = _free_port()
        self.settings = settings.model_copy(
            update={
                "api_port": port,
                "producer_tokens": {_PRODUCER: SecretStr(self.token)},
                "status_db": settings.state_dir / "bench-api.sqlite3",
            }
        )
        self.url = f"http://127.0.0.1:{port}"
        super().__init__(self.settings, log, "api")

    async def ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise HeraldError(f"herald api exited with {self.proc.returncode}")
                try:
                    async with http.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.25)
        raise HeraldError("herald api never became ready")


def _intent(seq: int, run: str) -> bytes:
    return json.dumps(
        {
            "notification_type": "game.turn.ready",
            "recipient_user_ids": [f"user-{seq % 1000}"],
            "occurred_at_ms": 1_790_000_000_000 + seq,
            "request_id": f"bench-http-{run}-{seq}",
            "payload_json": {"game_id": f"g-{seq}", "game_name": "Bench", "turn_number": 1},
        }
    ).encode()


class _Connection:
    """One keep-alive HTTP/1.1 connection, written to and read from by hand: aiohttp's
    client cost ~0.8 ms of CPU per request, as much as the server it measured, on a
    box of two cores (docs/http-intake.md)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> _Connection:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def request(self, head: bytes, body: bytes = b"") -> int:
        """Send one request; its status once the whole answer is read."""
        self._writer.write(head + body)
        status_line = await self._reader.readline()
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self._reader.readexactly(length)
        return int(status_line.split()[1])

    def close(self) -> None:
        self._writer.close()


async def _offer(
    api: ApiProcess, rate: float, duration_s: float, post: bool, run: str
) -> tuple[list[float], dict[int, int]]:
    """Latencies (ms) of the requests due after the warm-up, and the answers by status."""
    total = int((duration_s + _WARM_S) * rate)
    warm = int(_WARM_S * rate)
    latencies: list[float] = []
    answers: dict[int, int] = {}
    due: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    connections = [await _Connection.open(api.url) for _ in range(_CONNECTIONS)]
    auth = f"Authorization: Bearer {api.token}\r\nHost: bench\r\n"

    async def serve(connection: _Connection) -> None:
        while (item := await due.get()) is not None:
            seq, at = item
            if post:
                body = _intent(seq, run)
                head = (
                    f"POST /api/v1/notifications HTTP/1.1\r\n{auth}"
                    f"Idempotency-Key: {run}-{seq}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                status = await connection.request(head, body)
            else:
                status = await connection.request(f"GET /healthz HTTP/1.1\r\n{auth}\r\n".encode())
            if seq >= warm:
                latencies.append((time.monotonic() - at) * 1000)
                answers[status] = answers.get(status, 0) + 1

    servers = [asyncio.ensure_future(serve(c)) for c in connections]
    start = time.monotonic() + 0.1
    for seq in range(total):
        at = start + seq / rate
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        due.put_nowait((seq, at))
    for _ in servers:
        due.put_nowait(None)
    await asyncio.gather(*servers)
    for connection in connections:
        connection.close()
    return latencies, answers


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def http_runs(
    settings: Settings, rate: float, duration_s: float, state: Path
) -> list[dict[str, Any]]:
    """The baseline and the intake run against one `herald api`; each a dict of
    figures (P50/P95/P99 ms, answers by status)."""
    api = ApiProcess(settings, state / "api.log")
    try:
        asyncio.run(api.ready())
        figures = []
        for name, post in ((BASELINE, False), (INTAKE, True)):
            latencies, answers = asyncio.run(_offer(api, rate, duration_s, post, state.name))
            figures.append(
                {
                    "name": name,
                    "rate": rate,
                    "count": len(latencies),
                    "p50_ms": round(_percentile(latencies, 0.50), 2),
                    "p95_ms": round(_percentile(latencies, 0.95), 2),
                    "p99_ms": round(_percentile(latencies, 0.99), 2),
                    "answers": {str(k): v for k, v in sorted(answers.items())},
                }
            )
        return figures
    finally:
        api.stop()
