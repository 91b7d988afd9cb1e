"""A worker's HTTP side: /metrics, /healthz and /readyz on HERALD_METRICS_PORT.

Liveness is "the event loop answers". Readiness is what a load balancer or a rolling
update should wait for: Kafka takes the worker's writes (the acked sink is not stuck
retrying), its tables are recovered, and the SMTP server accepts connections (the
stub provider needs none). The SMTP probe is a TCP connect, cached for a few seconds,
so probes never open SMTP sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from pipeline.agents.base import AckedSink
from pipeline.settings import Settings

log = logging.getLogger(__name__)

_SMTP_PROBE_TTL_S = 10.0
_SMTP_PROBE_TIMEOUT_S = 2.0


class WorkerHealth:
    """The readiness checks of one worker."""

    def __init__(
        self, settings: Settings, sink: AckedSink, tables_recovered: Callable[[], bool]
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._tables_recovered = tables_recovered
        self._smtp: tuple[float, bool] = (0.0, False)

    async def checks(self) -> dict[str, bool]:
        """Each check by name."""
        return {
            "kafka": not self._sink.stalled,
            "tables_recovered": self._tables_recovered(),
            "smtp": await self._smtp_reachable(),
        }

    async def _smtp_reachable(self) -> bool:
        if self._settings.email_provider != "smtp":
            return True
        checked_at, ok = self._smtp
        if time.monotonic() - checked_at < _SMTP_PROBE_TTL_S:
            return ok
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(self._settings.smtp_host, self._settings.smtp_port),
                _SMTP_PROBE_TIMEOUT_S,
            )
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            ok = True
        except (OSError, TimeoutError):
            ok = False
        self._smtp = (time.monotonic(), ok)
        return ok

    def app(self) -> web.Application:
        """The worker's HTTP application."""

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        async def readyz(_: web.Request) -> web.Response:
            checks = await self.checks()
            ready = all(checks.values())
            return web.json_response(
                {"ready": ready, "checks": checks}, status=200 if ready else 503
            )

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        return app

    async def serve(self) -> None:
        """Serve until cancelled; a port in use is logged, not fatal (a second worker on
        one host without its own HERALD_METRICS_PORT)."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._settings.metrics_host, self._settings.metrics_port)
            try:
                await site.start()
            except OSError as exc:
                log.warning("no /metrics, /readyz on port %d: %s", self._settings.metrics_port, exc)
                return
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
