"""The in-app channel: each route becomes one entry in the user's inbox.

The entry (pipeline.contracts.inbox) is written to the compacted
notification.inapp.inbox topic, keyed by user and notification, so a notification is
in a user's inbox once, however often its route is written (a route in doubt after a
crash is written again: the same key, the same entry). Its title and body come from
``inapp_title.j2``/``inapp_body.j2``, else the type's push texts, else its mail's
subject and text. The API process serves the inbox (pipeline.web.inbox).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from pipeline.contracts.inbox import InboxEntry, inbox_record
from pipeline.contracts.records import ChannelRequest, Recipient, UserProfile
from pipeline.runtime.records import Write
from pipeline.stages.channel import Address, PlainTransport, Prepared, Sent
from pipeline.stages.context import StageContext
from pipeline.topology import TypeSpec

NAME = "inapp"
INBOX = "notification.inapp.inbox"


class InappRouting:
    """The in-app channel to the route stage: every user has an inbox."""

    name = NAME

    def address(self, profile: UserProfile, spec: TypeSpec) -> Address | str:
        return Address()

    def deadline_ms(self, recipient: Recipient, spec: TypeSpec) -> int:
        return 0


class InappTransport(PlainTransport):
    """Renders the entry and writes it to the inbox topic (acknowledged)."""

    def __init__(self, ctx: StageContext, write: Write) -> None:
        super().__init__(ctx)
        self._topic = ctx.settings.topic(INBOX)
        self._partitions = ctx.topology.spec(INBOX).partitions
        self._write = write

    def prepare(self, request: ChannelRequest, now_ms: int) -> Prepared[InboxEntry]:
        variables, required = self.variables(request)
        title, body, locale = self._templates_for(
            request.template_id, request.template_version
        ).render_inapp(request.template_id, request.locale, variables, required)
        entry = InboxEntry(
            user_id=request.user_id or "",
            notification_id=request.notification_id,
            route_id=request.route_id,
            notification_type=request.notification_type,
            title=title,
            body=body,
            locale=locale,
            created_at_ms=now_ms,
        )
        return Prepared(entry, locale)

    async def send(self, message: InboxEntry) -> Sent:
        await self._write([inbox_record(self._topic, self._partitions, message)])
        return Sent("in the inbox")


class InappKind:
    """The in-app channel's parts, for the worker."""

    #: Entries one worker writes at once (each waits for Kafka's acknowledgement).
    window = 32

    def __init__(self, ctx: StageContext) -> None:
        self._ctx = ctx

    def transport(self, write: Write) -> InappTransport:
        return InappTransport(self._ctx, write)

    def tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return []
