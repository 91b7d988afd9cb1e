"""HTTP delivery for the channels that POST (webhook, Slack, SMS; issue 15): one
request, and its answer classified the way every such channel needs it.

- 2xx: delivered (:class:`HttpReceipt`).
- 410 Gone: the endpoint wants no more (:class:`~pipeline.errors.EndpointGoneError`,
  permanent; the webhook channel disables the endpoint).
- 408, 429 and 5xx: try again (:class:`~pipeline.errors.HttpDeferredError`, transient,
  with the endpoint's Retry-After in seconds when it sent one).
- Any other 4xx, and redirects (never followed: a delivery goes where it was
  configured to go): :class:`~pipeline.errors.HttpRejectedError`, permanent.
- No answer within ``HERALD_HTTP_TIMEOUT_S``, or no connection: transient, and counted
  as the endpoint being away.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp

from pipeline.errors import (
    EndpointGoneError,
    HttpConnectionError,
    HttpDeferredError,
    HttpRejectedError,
    HttpTimeoutError,
)
from pipeline.settings import Settings
from pipeline.values import value_class

#: The longest Retry-After honoured; a later one is read as this.
MAX_RETRY_AFTER_S = 86_400.0
#: How much of an answer's body an error keeps (for the dead letter's detail).
_BODY_CHARS = 300


@value_class
class HttpReceipt:
    """An endpoint's acceptance of one request."""

    status: int
    """The 2xx status."""
    body: str
    """The start of the answer's body."""


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date), capped at
    :data:`MAX_RETRY_AFTER_S`; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class HttpPoster:
    """POSTs over one pooled aiohttp session, opened on first use."""

    def __init__(self, settings: Settings) -> None:
        self._timeout = aiohttp.ClientTimeout(total=settings.http_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpReceipt:
        """Send ``body`` to ``url``; the receipt, or a classified error (module docstring)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(
                url, data=body, headers=dict(headers), allow_redirects=False
            ) as response:
                text = (await response.text(errors="replace"))[:_BODY_CHARS]
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except TimeoutError:
            raise HttpTimeoutError(f"{url}: no answer within {self._timeout.total}s") from None
        except aiohttp.ClientError as exc:
            raise HttpConnectionError(f"{url}: {type(exc).__name__}: {exc}") from None
        if 200 <= status < 300:
            return HttpReceipt(status, text)
        detail = f"{url} answered {status}: {text}"
        if status == 410:
            raise EndpointGoneError(detail, code=status)
        if status in (408, 429) or status >= 500:
            raise HttpDeferredError(detail, code=status, retry_after_s=retry_after_s(retry_after))
        raise HttpRejectedError(detail, code=status)

    async def close(self) -> None:
        """Close the session (its pooled connections)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
