"""A worker's readiness checks: Kafka writes, table recovery, the SMTP server."""

from __future__ import annotations

import asyncio

from pipeline.runtime.health import WorkerHealth
from pipeline.runtime.sink import AckedSink
from pipeline.settings import Settings
from tests.smtp import free_port
from tests.unit.helpers import FakeBroker


async def test_readiness_reflects_kafka_tables_and_smtp(settings: Settings) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = AckedSink(FakeBroker().write)
    recovered = [False]
    smtp = settings.model_copy(
        update={
            "email_provider": "smtp",
            "smtp_port": port,
            # A broker "reachable" on the same listener: the probe is a TCP connect.
            "kafka_bootstrap_servers": f"127.0.0.1:{free_port()},127.0.0.1:{port}",
        }
    )
    health = WorkerHealth(smtp, sink, lambda: recovered[0])
    assert await health.checks() == {"kafka": True, "tables_recovered": False, "smtp": True}
    recovered[0] = True
    sink.stalled = True
    assert (await health.checks())["kafka"] is False
    server.close()
    await server.wait_closed()

    down = settings.model_copy(
        update={
            "email_provider": "smtp",
            "smtp_port": free_port(),
            "kafka_bootstrap_servers": f"127.0.0.1:{free_port()}",
        }
    )
    sink.stalled = False
    checks = await WorkerHealth(down, sink, lambda: True).checks()
    assert (checks["smtp"], checks["kafka"]) == (False, False)
    stub = settings.model_copy(update={"email_provider": "stub", "smtp_port": free_port()})
    assert (await WorkerHealth(stub, sink, lambda: True).checks())["smtp"] is True
