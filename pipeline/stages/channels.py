"""Every channel module Herald has, by name: topologies/topics.yaml says which run.

A direct channel (one provider call per route) gives the worker a :class:`DirectKind`;
push, which publishes batches to the gateway topic and can be published by the route
stage itself (docs/push.md), is wired by the worker on its own. Adding a channel:
docs/channels.md.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from pipeline.errors import ConfigurationError
from pipeline.runtime.records import Write
from pipeline.stages.channel import ChannelRouting, Transport
from pipeline.stages.context import StageContext
from pipeline.stages.email import EmailKind, EmailRouting
from pipeline.stages.inapp import InappKind, InappRouting
from pipeline.stages.push import PushRouting
from pipeline.stages.slack import SlackKind, SlackRouting
from pipeline.stages.sms import SmsKind, SmsRouting
from pipeline.stages.webhook import WebhookKind, WebhookRouting


class DirectKind(Protocol):
    """A direct channel's parts, built once per worker from the stage context."""

    window: int
    """Routes one lane sends at once."""

    def transport(self, write: Write) -> Transport[Any]:
        """A transport for one lane (its own connections); ``write`` writes records to
        Kafka and waits for their acknowledgement."""
        ...

    def tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        """Background work the channel needs while the worker runs (followed views)."""
        ...


#: The channels delivered by one provider call per route.
DIRECT: dict[str, Callable[[StageContext], DirectKind]] = {
    "email": EmailKind,
    "webhook": WebhookKind,
    "slack": SlackKind,
    "sms": SmsKind,
    "inapp": InappKind,
}
#: The channel the worker wires itself (batched publication, the route stage's hand-off).
PUSH = "push"


def routings(ctx: StageContext, invalid_tokens: Mapping[bytes, Any]) -> dict[str, ChannelRouting]:
    """How the route stage addresses each channel topics.yaml declares;
    ``invalid_tokens``: the push tokens the gateway reported dead, by user_id."""
    made: dict[str, ChannelRouting] = {
        "email": EmailRouting(),
        PUSH: PushRouting(invalid_tokens),
        "webhook": WebhookRouting(ctx.settings),
        "slack": SlackRouting(),
        "sms": SmsRouting(),
        "inapp": InappRouting(),
    }
    if unknown := sorted(set(ctx.topology.channels) - set(made)):
        raise ConfigurationError(
            f"topics.yaml declares channels Herald has no module for: {unknown}"
        )
    return {name: made[name] for name in ctx.topology.channels}
