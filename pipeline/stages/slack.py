"""The Slack channel: each route is one message to a Slack incoming webhook.

The webhook is the type's (``slack_webhook`` in the catalog, a name HERALD_SLACK_WEBHOOKS
maps to its URL; the route carries only the name, so the URL, which is the webhook's
credential, never reaches a topic) or the user's own (``contacts["slack"]``). Only
Slack's webhook URLs are accepted (``https://hooks.slack.com/services/...``), and the
path is posted to HERALD_SLACK_BASE_URL: a user's contact cannot send Herald anywhere
else. The text comes from ``templates/<type>/<locale>/slack.j2`` (mrkdwn; the values of
variables are escaped, pipeline.rendering) and is sent as the message's ``text`` and as
section blocks of at most 3,000 characters each. Answers as for every HTTP channel
(pipeline.providers.http): 2xx sent; 429 (with Retry-After), 5xx, timeouts transient;
Slack's 400/403/404 (invalid_payload, action_prohibited, no_service) and 410
(channel_is_archived) permanent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

from pipeline.contracts.records import ChannelRequest, Recipient, UserProfile
from pipeline.errors import ConfigurationError, RenderError
from pipeline.providers.http import HttpPoster
from pipeline.runtime.records import Write
from pipeline.settings import Settings
from pipeline.stages.channel import Address, PlainTransport, Prepared, Sent, templated_types
from pipeline.stages.context import StageContext
from pipeline.topology import TypeSpec
from pipeline.values import value_class

NAME = "slack"
#: The host of Slack's incoming webhooks.
SLACK_HOST = "hooks.slack.com"
#: A route's address when it goes to a named webhook: this prefix and the name.
NAMED = "named:"
#: Slack's limit on one section block's text, and on blocks per message.
BLOCK_CHARS = 3000
MAX_BLOCKS = 50


def webhook_path(url: str) -> str | None:
    """The path of a Slack incoming-webhook URL, or None when ``url`` is not one."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if parts.scheme != "https" or parts.hostname != SLACK_HOST or parts.port is not None:
        return None
    if not parts.path.startswith("/services/") or parts.query or parts.fragment:
        return None
    return parts.path


class SlackRouting:
    """The Slack channel to the route stage: the type's named webhook, else the user's."""

    name = NAME

    def address(self, profile: UserProfile, spec: TypeSpec) -> Address | str:
        if spec.slack_webhook is not None:
            return Address(NAMED + spec.slack_webhook)
        url = profile.contacts.get(NAME)
        if not url:
            return "no_slack_webhook"
        if webhook_path(url) is None:
            return "invalid_slack_webhook"
        return Address(url)

    def deadline_ms(self, recipient: Recipient, spec: TypeSpec) -> int:
        return 0


@value_class
class SlackMessage:
    """One message for one incoming webhook."""

    url: str
    """Where it is posted (HERALD_SLACK_BASE_URL and the webhook's path)."""
    body: bytes
    """The JSON body: text and blocks."""


def slack_body(text: str) -> bytes:
    """The message: ``text``, and the same text as section blocks Slack accepts."""
    if not text:
        raise RenderError("the slack template rendered nothing")
    chunks = [text[i : i + BLOCK_CHARS] for i in range(0, len(text), BLOCK_CHARS)]
    if len(chunks) > MAX_BLOCKS:
        raise RenderError(f"the slack text needs {len(chunks)} blocks; Slack takes {MAX_BLOCKS}")
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": c}} for c in chunks]
    return json.dumps({"text": text, "blocks": blocks}, ensure_ascii=False).encode()


class SlackTransport(PlainTransport):
    """Renders a route's slack.j2 and posts it to its incoming webhook."""

    def __init__(self, ctx: StageContext, poster: HttpPoster) -> None:
        super().__init__(ctx)
        self._base = ctx.settings.slack_base_url.rstrip("/")
        self._named = ctx.settings.slack_webhooks
        self._poster = poster

    def prepare(self, request: ChannelRequest, now_ms: int) -> Prepared[SlackMessage]:
        text, locale = self.render(request, NAME)
        return Prepared(SlackMessage(self._url(request.address or ""), slack_body(text)), locale)

    def _url(self, address: str) -> str:
        if address.startswith(NAMED):
            secret = self._named.get(address.removeprefix(NAMED))
            if secret is None:
                raise ConfigurationError(f"no Slack webhook named {address!r} is configured")
            address = secret.get_secret_value()
        path = webhook_path(address)
        if path is None:
            raise ConfigurationError("not a Slack incoming-webhook URL")
        return self._base + path

    async def send(self, message: SlackMessage) -> Sent:
        headers = {"content-type": "application/json; charset=utf-8"}
        receipt = await self._poster.post(message.url, message.body, headers)
        return Sent(f"{receipt.status} {receipt.body}")


class SlackKind:
    """The Slack channel's parts, for the worker."""

    def __init__(self, ctx: StageContext) -> None:
        self._ctx = ctx
        settings: Settings = ctx.settings
        for spec in templated_types(ctx, NAME):
            name = spec.slack_webhook
            if name is not None and name not in settings.slack_webhooks:
                raise ConfigurationError(
                    f"type {spec.name!r} names Slack webhook {name!r}, which "
                    "HERALD_SLACK_WEBHOOKS does not define"
                )
        for name, url in settings.slack_webhooks.items():
            if webhook_path(url.get_secret_value()) is None:
                raise ConfigurationError(
                    f"Slack webhook {name!r} is not an https://{SLACK_HOST}/services/... URL"
                )
        self.window = settings.slack_connections

    def transport(self, write: Write) -> SlackTransport:
        return SlackTransport(self._ctx, HttpPoster(self._ctx.settings))

    def tasks(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        return []
