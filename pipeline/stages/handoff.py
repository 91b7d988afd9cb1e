"""Route and push in one step: the route stage publishes a routed push itself.

Recipients and push routes are both keyed by user_id on copartitioned topics, so the
push registry entry of a route lives on the partition the route stage is already
reading. Instead of writing the route to ``notification.push.requested`` for the push
stage to read back (one more Kafka record, one more pass through Faust, decoding it
again), the route stage hands a route it routes now straight to the push channel, as
if the push stage had read it from that partition: the same registry, write-ahead,
retries (which return to ``notification.push.requested``), dead letters and status
events. The route's request is kept on ``notification.push.routes`` for the status
view (a resend clones it onto the push lane).

Routes that wait (quiet hours) and every retry, replay and resend still go through
``notification.push.requested`` and the push stage.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Sequence

from pipeline.runtime.batches import then
from pipeline.runtime.records import Out, RawRecord
from pipeline.runtime.tables import WriteBehind
from pipeline.stages.context import StageContext
from pipeline.stages.push import PushChannel
from pipeline.stages.route import Router, RouteTables

#: Name of the push registry among the route stage's tables.
PUSH_REGISTRY = "push-deliveries"
#: Names of the user limits and the digests tables among the route stage's tables.
LIMITS = "user-limits"
DIGESTS = "digests"


def route_tables(view: WriteBehind) -> RouteTables:
    """The route stage's further tables, from its view."""
    return RouteTables(limits=view.attached(LIMITS), digests=view.attached(DIGESTS))


class RouteAndPush:
    """The route stage's handle with the push hand-off (see the module docstring)."""

    def __init__(self, ctx: StageContext, router: Router, push: PushChannel) -> None:
        self._router = router
        self._push = push
        self._clock = ctx.clock
        self._push_requests = ctx.settings.topic("notification.push.requested")
        self._push_routes = ctx.settings.topic("notification.push.routes")

    def handle(self, raw: RawRecord, view: WriteBehind) -> Sequence[Out] | Awaitable[list[Out]]:
        """The router's outputs, with each push route published rather than written."""
        outputs: list[Out] = []
        publishing: list[Awaitable[Sequence[Out]]] = []
        routed = self._router.handle(raw, view, self._clock.now_ms(), route_tables(view))
        for out in routed:
            if out.topic != self._push_requests:
                outputs.append(out)
                continue
            outputs.append(Out(self._push_routes, out.key, out.value))
            # As the push stage would have read it: same partition (copartitioned).
            route = RawRecord(
                self._push_requests, raw.partition, raw.offset, raw.timestamp_ms, out.key, out.value
            )
            result = self._push.handle(route, view.attached(PUSH_REGISTRY))
            if inspect.isawaitable(result):
                publishing.append(result)
            else:
                outputs.extend(result)
        if not publishing:
            return outputs
        if len(publishing) == 1 and isinstance(publishing[0], asyncio.Future):
            # The usual case (one push route per user): no task of its own.
            return then(publishing[0], lambda published: [*outputs, *published])
        return self._published(outputs, publishing)

    @staticmethod
    async def _published(
        outputs: list[Out], publishing: list[Awaitable[Sequence[Out]]]
    ) -> list[Out]:
        for result in publishing:
            outputs.extend(await result)
        return outputs
