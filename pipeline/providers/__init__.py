"""Delivery providers: what actually hands a message to the outside world.

An email provider takes one MIME message for one recipient (a :class:`Mail`) and either returns a
receipt (the server accepted it) or raises a classified :mod:`pipeline.errors` error:
transient (4xx, timeouts, connection trouble) or permanent (5xx).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pipeline.providers.mime import Mail
from pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """The server's acceptance of one message."""

    code: int
    """SMTP reply code (250)."""
    message: str
    """The server's reply text (often with its queue id)."""


class EmailProvider(Protocol):
    """Sends one message to one recipient."""

    async def send(self, mail: Mail) -> SendReceipt:
        """Deliver ``mail`` to its recipient; raise a classified error otherwise."""
        ...

    async def probe(self) -> None:
        """Check that the server takes connections (no mail); raise a classified
        error otherwise. The circuit breaker's probe."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def email_provider(settings: Settings) -> EmailProvider:
    """The provider the settings select, for one delivery lane: a pool of
    ``smtp_connections`` SMTP connections (the stub needs one)."""
    if settings.email_provider == "stub":
        from pipeline.providers.stub import StubEmailProvider

        return StubEmailProvider(settings.stub_outcomes)
    from pipeline.providers.pool import ProviderPool
    from pipeline.providers.smtp import SmtpProvider

    return ProviderPool([SmtpProvider(settings) for _ in range(settings.smtp_connections)])
