"""A worker's HTTP side: /metrics, /healthz and /readyz on HERALD_METRICS_PORT.

Liveness is "the event loop answers". Readiness is what a load balancer or a rolling
update should wait for: a broker accepts connections and Kafka takes the worker's
writes (the acked sink is not stuck retrying), its tables are recovered, and the SMTP
server accepts connections (the stub provider needs none). The reachability probes are
TCP connects, cached for a few seconds, so probes never open SMTP sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from pipeline.runtime.sink import AckedSink
from pipeline.settings import Settings

log = logging.getLogger(__name__)

_PROBE_TTL_S = 10.0
_PROBE_TIMEOUT_S = 2.0


class WorkerHealth:
    """The readiness checks of one worker."""

    def __init__(
        self, settings: Settings, sink: AckedSink, tables_recovered: Callable[[], bool]
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._tables_recovered = tables_recovered
        self._probes: dict[str, tuple[float, bool]] = {}

    async def checks(self) -> dict[str, bool]:
        """Each check by name."""
        settings = self._settings
        brokers = [s.rsplit(":", 1) for s in settings.kafka_bootstrap_servers.split(",")]
        reachable = [await self._reachable(host, int(port)) for host, port in brokers]
        smtp = settings.email_provider != "smtp" or await self._reachable(
            settings.smtp_host, settings.smtp_port
        )
        return {
            "kafka": any(reachable) and not self._sink.stalled,
            "tables_recovered": self._tables_recovered(),
            "smtp": smtp,
        }

    async def _reachable(self, host: str, port: int) -> bool:
        checked_at, ok = self._probes.get(f"{host}:{port}", (0.0, False))
        if time.monotonic() - checked_at < _PROBE_TTL_S:
            return ok
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), _PROBE_TIMEOUT_S
            )
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            ok = True
        except (OSError, TimeoutError):
            ok = False
        self._probes[f"{host}:{port}"] = (time.monotonic(), ok)
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
