"""SMTP delivery over aiosmtplib, one reused connection per delivery lane."""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import parseaddr

import aiosmtplib

from pipeline import tracing
from pipeline.errors import (
    HeraldError,
    SmtpConnectionError,
    SmtpDeferredError,
    SmtpRejectedError,
    SmtpTimeoutError,
)
from pipeline.providers import SendReceipt
from pipeline.providers.mime import Mail
from pipeline.settings import Settings

log = logging.getLogger(__name__)

#: A connection idle this long is checked with NOOP before use (servers drop idle ones).
_IDLE_CHECK_S = 30.0


def classify_reply(code: int, message: str, *, recipient: bool = False) -> HeraldError:
    """The error for an SMTP reply that was not a success (``recipient``: the reply
    refused the recipient, as opposed to the sender or the message)."""
    text = f"{code} {message}".strip()
    if 400 <= code < 500:
        return SmtpDeferredError(text, code=code)
    if 500 <= code < 600:
        return SmtpRejectedError(
            text, code=code, reason="recipient_rejected" if recipient else None
        )
    return SmtpConnectionError(f"unexpected SMTP reply {text}", code=code)


class SmtpProvider:
    """Sends through the configured SMTP server; connects lazily and reuses the
    connection. Any failure drops the connection, so the next send starts clean."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._sender = parseaddr(settings.smtp_from)[1]
        self._client: aiosmtplib.SMTP | None = None
        self._last_used = 0.0
        self._lock = asyncio.Lock()

    async def send(self, mail: Mail) -> SendReceipt:
        async with self._lock:
            try:
                client = await self._connected()
                with tracing.client_span(
                    "smtp send",
                    {
                        "server.address": self._settings.smtp_host,
                        "server.port": self._settings.smtp_port,
                        "herald.message_id": mail.message_id,
                    },
                ) as span:
                    _, reply = await client.sendmail(self._sender, [mail.recipient], mail.data)
                    span.set_attribute("smtp.reply", reply)
            except aiosmtplib.SMTPRecipientsRefused as exc:
                await self._drop()
                refused = exc.recipients[0]
                raise classify_reply(refused.code, refused.message, recipient=True) from exc
            except aiosmtplib.SMTPAuthenticationError as exc:
                await self._drop()
                raise SmtpConnectionError(
                    f"SMTP AUTH failed: {exc.code} {exc.message}", reason="smtp_auth"
                ) from exc
            except aiosmtplib.SMTPResponseException as exc:
                await self._drop()
                raise classify_reply(exc.code, exc.message) from exc
            except aiosmtplib.SMTPTimeoutError as exc:
                await self._drop()
                raise SmtpTimeoutError(
                    f"no SMTP reply within {self._settings.smtp_timeout_s}s: {exc}"
                ) from exc
            except (aiosmtplib.SMTPException, OSError) as exc:
                await self._drop()
                raise SmtpConnectionError(f"{type(exc).__name__}: {exc}") from exc
            self._last_used = time.monotonic()
        code, _, text = reply.partition(" ")
        return SendReceipt(int(code) if code.isdigit() else 250, text or reply)

    async def probe(self) -> None:
        async with self._lock:
            try:
                await self._connected()
            except aiosmtplib.SMTPTimeoutError as exc:
                await self._drop()
                raise SmtpTimeoutError(f"probe: no SMTP greeting: {exc}") from exc
            except (aiosmtplib.SMTPException, OSError) as exc:
                # Any refusal to start a session (a 421 greeting too) means "not back yet".
                await self._drop()
                raise SmtpConnectionError(f"probe: {type(exc).__name__}: {exc}") from exc
            self._last_used = time.monotonic()

    async def _connected(self) -> aiosmtplib.SMTP:
        client = self._client
        if client is not None and client.is_connected:
            if time.monotonic() - self._last_used < _IDLE_CHECK_S:
                return client
            try:
                await client.noop()
                return client
            except aiosmtplib.SMTPException:
                await self._drop()
        settings = self._settings
        client = aiosmtplib.SMTP(
            hostname=settings.smtp_host,
            port=settings.smtp_port,
            timeout=settings.smtp_timeout_s,
            use_tls=settings.smtp_security == "tls",
            start_tls=settings.smtp_security == "starttls",
            validate_certs=settings.smtp_validate_certs,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
        )
        await client.connect()
        self._client = client
        log.info("connected to SMTP %s:%d", settings.smtp_host, settings.smtp_port)
        return client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()
