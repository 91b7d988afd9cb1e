"""AckedSink: returns only when every record was acknowledged, resending refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pipeline.agents.base import AckedSink, Out


class FlakyBroker:
    """Refuses the first ``failures`` sends of topic 'b', acknowledges everything else."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.acked: list[bytes | None] = []

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> Any:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if topic == "b" and self.failures > 0:
            self.failures -= 1
            future.set_exception(RuntimeError("not enough replicas"))
        else:
            self.acked.append(value)
            future.set_result(None)
        return future


async def test_refused_records_are_resent_until_acknowledged() -> None:
    broker = FlakyBroker(failures=2)
    sink = AckedSink(broker.send, max_backoff_s=0.01)
    await sink.deliver([Out("a", None, b"1"), Out("b", None, b"2"), Out("a", None, b"3")])
    assert sorted(v or b"" for v in broker.acked) == [b"1", b"2", b"3"]
    assert broker.acked.count(b"1") == 1  # what was acknowledged is not sent again
    assert not sink.stalled
