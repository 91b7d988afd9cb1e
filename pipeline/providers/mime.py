"""The MIME message for one route.

Herald alone chooses the headers: From and Reply-To come from settings, To is the
route's checked address, Subject is one folded line, and the Message-ID is derived
from the route id, so a resend after a crash carries the same id and receivers can
drop the copy. Nothing a producer sends becomes a header of its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, parseaddr

from pipeline.contracts.records import Attachment
from pipeline.errors import InvalidAddressError
from pipeline.rendering import one_line
from pipeline.settings import Settings

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_MAX_ADDRESS = 254


def checked_address(address: str | None) -> str:
    """``address`` if it is one plain mailbox (user@domain), else InvalidAddressError."""
    if not address:
        raise InvalidAddressError("the route has no email address")
    if _CONTROL.search(address) or len(address) > _MAX_ADDRESS:
        raise InvalidAddressError(f"address has control characters or is too long: {address!r}")
    _, parsed = parseaddr(address)
    local, at, domain = parsed.rpartition("@")
    if parsed != address or not at or not local or "." not in domain or " " in address:
        raise InvalidAddressError(f"not a plain mailbox: {address!r}")
    return address


def message_id(route_id: str, domain: str) -> str:
    """The Message-ID of every attempt of one route."""
    return f"<{route_id}@{domain}>"


def build_message(
    settings: Settings,
    *,
    route_id: str,
    notification_id: str,
    notification_type: str,
    to: str,
    subject: str,
    text: str,
    html: str | None,
    locale: str,
    attachments: Sequence[Attachment] = (),
    now_ms: int,
) -> EmailMessage:
    """A multipart/alternative mail (multipart/mixed with attachments)."""
    message = EmailMessage(policy=SMTP)
    message["From"] = settings.smtp_from
    message["To"] = checked_address(to)
    if settings.smtp_reply_to:
        message["Reply-To"] = settings.smtp_reply_to
    message["Subject"] = one_line(subject)
    message["Date"] = formatdate(now_ms / 1000, usegmt=True)
    message["Message-ID"] = message_id(route_id, settings.message_id_domain)
    # RFC 3834: tells vacation responders not to answer.
    message["Auto-Submitted"] = "auto-generated"
    message["X-Herald-Route-Id"] = _token(route_id)
    message["X-Herald-Notification-Id"] = _token(notification_id)
    message["X-Herald-Type"] = _token(notification_type)
    message.set_content(text)
    if html is not None:
        message.add_alternative(html, subtype="html")
    for attachment in attachments:
        content_type = attachment.content_type.lower().strip()
        if not _MIME_TYPE.match(content_type):
            content_type = "application/octet-stream"
        maintype, subtype = content_type.split("/", 1)
        message.add_attachment(
            attachment.data,
            maintype=maintype,
            subtype=subtype,
            filename=_filename(attachment.filename),
        )
    # After the body: set_content() drops every Content-* header set before it.
    message["Content-Language"] = _token(locale)
    return message


def _token(value: str) -> str:
    """A header value Herald derived: no control characters, no spaces."""
    return _CONTROL.sub("", value).replace(" ", "")[:200] or "-"


def _filename(name: str) -> str:
    cleaned = _CONTROL.sub("", name).replace("/", "_").replace("\\", "_").strip()
    return cleaned[:200] or "attachment"
