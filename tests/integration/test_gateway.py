"""The gateway check for in-doubt routes (GatewayPublisher.find) against the real broker."""

from __future__ import annotations

import asyncio
import time

from pipeline.providers.gateway import GatewayPublisher
from pipeline.settings import Settings


def push(route_id: str) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """A push of ``route_id`` for user-1 (one key: one partition)."""
    return b"user-1", b"payload", [("route_id", route_id.encode())]


async def test_in_doubt_routes_are_found_by_one_read_of_their_partition(
    isolated: Settings,
) -> None:
    gateway = GatewayPublisher(isolated)
    since_ms = int(time.time() * 1000) - 60_000
    try:
        first = await gateway.publish_many([push(f"r{i}") for i in range(300)])
        # Asked together (a batch of in-doubt routes): answered together.
        found = await asyncio.gather(
            *(gateway.find(b"user-1", f"r{i}", since_ms + i) for i in range(300))
        )
        assert found == first  # each at the offset its publication reported
        assert await gateway.find(b"user-1", "never-published", since_ms) is None

        # Published after the partition was read: the next question reads on from there.
        (late,) = await gateway.publish_many([push("late")])
        assert await gateway.find(b"user-1", "late", since_ms + 1) == late
        # A route published before the time asked is still a route that went out.
        assert await gateway.find(b"user-1", "r0", int(time.time() * 1000)) == first[0]

        # Asked from an earlier time than the partition was read from: read again.
        fresh = GatewayPublisher(isolated)
        try:
            assert await fresh.find(b"user-1", "r5", int(time.time() * 1000)) is None
            assert await fresh.find(b"user-1", "r5", since_ms) == first[5]
        finally:
            await fresh.close()
    finally:
        await gateway.close()
