"""The benchmark's Faust baseline: one agent forwarding raw records from one topic to
another, in an app configured like Herald's (`python -m pipeline.ops.bench_faust SRC DST`).
"""

from __future__ import annotations

import sys
from typing import Any

import faust

from pipeline.runtime.faust import create_faust_app
from pipeline.settings import Settings


def main(source: str, target: str) -> None:
    settings = Settings()
    settings.worker_dir.mkdir(parents=True, exist_ok=True)
    app = create_faust_app(settings, longest_hold_s=1.0)
    app.conf.id = f"{settings.app_id}-faust-passthrough"
    inbound = app.topic(source, key_serializer="raw", value_serializer="raw")
    outbound = app.topic(target, key_serializer="raw", value_serializer="raw")

    async def forward(stream: Any) -> None:
        async for event in stream.events():
            await outbound.send(key=event.key, value=event.value)

    app.agent(inbound, name="bench.forward", concurrency=1)(forward)
    faust.Worker(app, loglevel="warning").execute_from_commandline()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
