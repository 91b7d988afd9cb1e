"""The MIME message for one route, written as the bytes the SMTP server receives.

Herald alone chooses the headers: From and Reply-To come from settings, To is the
route's checked address, Subject is one folded line, and the Message-ID is derived
from the route id, so a resend after a crash carries the same id and receivers can
drop the copy. Nothing a producer sends becomes a header of its own.

The bytes are written here rather than by the standard library's ``email`` package:
building an ``EmailMessage`` with the SMTP policy and flattening it cost ~4 ms of CPU
per mail (header parsing on every assignment), most of what an email worker did
(issue 13; docs/performance.md). What is written is plain 7-bit MIME: headers that
are not plain ASCII as RFC 2047 encoded words, text parts quoted-printable,
attachments base64, attachment names per RFC 2231. The unit tests read every message
back with the standard parser.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, parseaddr
from urllib.parse import quote

from pipeline.contracts.records import Attachment
from pipeline.errors import InvalidAddressError
from pipeline.rendering import one_line
from pipeline.settings import Settings

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_PLAIN_FILENAME = re.compile(r"^[A-Za-z0-9 !#$%&'()*+,.:;<>?@\[\]^_`{|}~-]+$")
_MAX_ADDRESS = 254
#: Folding width for header lines (RFC 5322 asks for 78; 998 is the hard limit).
_WIDTH = 78
#: A plain word longer than this cannot be folded within 998 characters: encoded
#: words split it.
_LONGEST_WORD = 900
#: UTF-8 bytes per encoded word: 39 bytes are 52 base64 characters, 64 with the frame.
_WORD_BYTES = 39
#: Characters of one RFC 2231 filename section.
_SECTION = 60


@dataclass(frozen=True, slots=True)
class Mail:
    """One message for one recipient, ready for the SMTP DATA command."""

    recipient: str
    """The envelope and To address (checked: one plain ASCII mailbox)."""
    message_id: str
    """The Message-ID header, the same for every attempt of one route."""
    data: bytes
    """The whole message, CRLF line endings, 7-bit."""


def checked_address(address: str | None) -> str:
    """``address`` if it is one plain mailbox (user@domain), else InvalidAddressError."""
    if not address:
        raise InvalidAddressError("the route has no email address")
    if _CONTROL.search(address) or len(address) > _MAX_ADDRESS:
        raise InvalidAddressError(f"address has control characters or is too long: {address!r}")
    if not address.isascii():
        # Needs SMTPUTF8 (RFC 6531) or an IDNA domain; Herald sends neither.
        raise InvalidAddressError(f"not a plain ASCII mailbox: {address!r}")
    _, parsed = parseaddr(address)
    local, at, domain = parsed.rpartition("@")
    if parsed != address or not at or not local or "." not in domain or " " in address:
        raise InvalidAddressError(f"not a plain mailbox: {address!r}")
    return address


def message_id(route_id: str, domain: str) -> str:
    """The Message-ID of every attempt of one route."""
    return f"<{route_id}@{domain}>"


class MailWriter:
    """Writes the message of each route; the headers fixed by settings are folded
    once."""

    def __init__(self, settings: Settings) -> None:
        self._domain = settings.message_id_domain
        fixed = _address_field("From", settings.smtp_from)
        if settings.smtp_reply_to:
            fixed += _address_field("Reply-To", settings.smtp_reply_to)
        self._fixed = fixed

    def build(
        self,
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
    ) -> Mail:
        """A multipart/alternative mail (multipart/mixed with attachments); a text-only
        mail without attachments is a single text/plain part."""
        recipient = checked_address(to)
        mid = message_id(route_id, self._domain)
        head = [
            self._fixed,
            f"To: {recipient}\r\n",
            _field("Subject", one_line(subject)),
            f"Date: {formatdate(now_ms / 1000, usegmt=True)}\r\n",
            _field("Message-ID", mid),
            # RFC 3834: tells vacation responders not to answer.
            "Auto-Submitted: auto-generated\r\n",
            _field("X-Herald-Route-Id", _token(route_id)),
            _field("X-Herald-Notification-Id", _token(notification_id)),
            _field("X-Herald-Type", _token(notification_type)),
            _field("Content-Language", _token(locale)),
            "MIME-Version: 1.0\r\n",
        ]
        body = _text_part("plain", text)
        if html is not None:
            body = _multipart("alternative", [body, _text_part("html", html)])
        if attachments:
            body = _multipart("mixed", [body, *(_attachment_part(a) for a in attachments)])
        data = "".join(head).encode("ascii") + body
        return Mail(recipient=recipient, message_id=mid, data=data)


def _address_field(name: str, value: str) -> str:
    # Settings-given mailboxes, once per worker: the standard library folds them.
    message = EmailMessage(policy=SMTP)
    message[name] = value
    return str(SMTP.fold(name, message[name]))


def _field(name: str, value: str) -> str:
    """``name: value`` folded at spaces; RFC 2047 encoded words when the value is not
    plain ASCII, could be read as encoded words, or has a word too long to fold."""
    words = value.split(" ")
    if not value.isascii() or "=?" in value or max(map(len, words)) > _LONGEST_WORD:
        words = _encoded_words(value)
    line = f"{name}:"
    lines: list[str] = []
    for word in words:
        if word and len(line) + 1 + len(word) > _WIDTH and len(line) > len(name) + 1:
            lines.append(line)
            line = ""
        line += " " + word
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _encoded_words(value: str) -> list[str]:
    """``value`` as base64 UTF-8 encoded words, none splitting a character."""
    words: list[str] = []
    chunk = bytearray()
    for char in value:
        encoded = char.encode("utf-8", "replace")
        if len(chunk) + len(encoded) > _WORD_BYTES:
            words.append(_encoded_word(bytes(chunk)))
            chunk.clear()
        chunk += encoded
    if chunk or not words:
        words.append(_encoded_word(bytes(chunk)))
    return words


def _encoded_word(data: bytes) -> str:
    return f"=?utf-8?b?{base64.b64encode(data).decode('ascii')}?="


def _text_part(subtype: str, text: str) -> bytes:
    """A quoted-printable text part: 7-bit, lines within 76 characters, and never
    containing ``=_`` (so never a boundary of :func:`_multipart`)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n")
    if not lines.endswith("\n"):
        lines += "\n"
    encoded = binascii.b2a_qp(lines.encode("utf-8", "replace"), istext=True)
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode("ascii") + encoded.replace(b"\n", b"\r\n")


def _attachment_part(attachment: Attachment) -> bytes:
    content_type = attachment.content_type.lower().strip()
    if not _MIME_TYPE.match(content_type):
        content_type = "application/octet-stream"
    data = base64.encodebytes(attachment.data).replace(b"\n", b"\r\n")
    return (
        f"Content-Type: {content_type}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f"Content-Disposition: attachment;{_filename_param(_filename(attachment.filename))}\r\n"
        "\r\n"
    ).encode("ascii") + data


def _filename_param(name: str) -> str:
    """The ``filename`` parameter: quoted when plain, else RFC 2231 sections of
    percent-encoded UTF-8 (each on a line of its own)."""
    if _PLAIN_FILENAME.match(name) and len(name) <= _SECTION:
        return f' filename="{name}"'
    encoded = quote(name.encode("utf-8", "replace"), safe="")
    sections: list[str] = []
    while encoded:
        cut = min(_SECTION, len(encoded))
        # Never split a %XX escape.
        if "%" in encoded[max(cut - 2, 0) : cut]:
            cut = encoded.rindex("%", 0, cut)
        sections.append(encoded[:cut])
        encoded = encoded[cut:]
    first = f"\r\n filename*0*=utf-8''{sections[0]}"
    rest = "".join(f";\r\n filename*{i}*={s}" for i, s in enumerate(sections[1:], start=1))
    return first + rest


def _multipart(subtype: str, parts: Sequence[bytes]) -> bytes:
    # QP and base64 bodies never contain "=_", so this boundary never occurs in them.
    boundary = f"=_herald_{os.urandom(12).hex()}"
    delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
    head = (
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"\r\n\r\n--{boundary}\r\n'
    ).encode("ascii")
    return head + delimiter.join(parts) + f"\r\n--{boundary}--\r\n".encode("ascii")


def _token(value: str) -> str:
    """A header value Herald derived: no control characters, no spaces."""
    return _CONTROL.sub("", value).replace(" ", "")[:200] or "-"


def _filename(name: str) -> str:
    cleaned = _CONTROL.sub("", name).replace("/", "_").replace("\\", "_").strip()
    return cleaned[:200] or "attachment"
