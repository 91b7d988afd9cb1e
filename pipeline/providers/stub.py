"""A provider that sends nothing: it logs, keeps what it was given, and answers as
scripted (local runs, demos and drills without an SMTP server)."""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter

from pipeline.errors import (
    ConfigurationError,
    SmtpDeferredError,
    SmtpRejectedError,
    SmtpTimeoutError,
)
from pipeline.providers import SendReceipt
from pipeline.providers.mime import Mail

log = logging.getLogger(__name__)

OUTCOMES = ("accept", "defer", "reject", "timeout")


def parse_script(script: str) -> list[tuple[str, tuple[str, ...]]]:
    """``pattern=outcome[,outcome...]`` rules separated by ``;``, in order."""
    rules: list[tuple[str, tuple[str, ...]]] = []
    for rule in filter(None, (part.strip() for part in script.split(";"))):
        pattern, sep, sequence = rule.partition("=")
        outcomes = tuple(o.strip().lower() for o in sequence.split(",") if o.strip())
        unknown = [o for o in outcomes if o not in OUTCOMES]
        if not sep or not pattern.strip() or not outcomes or unknown:
            raise ConfigurationError(
                f"stub outcome rule {rule!r}: use pattern=outcome[,outcome...] "
                f"with outcomes {', '.join(OUTCOMES)}"
            )
        rules.append((pattern.strip().lower(), outcomes))
    return rules


class StubEmailProvider:
    """The first rule whose pattern matches the recipient decides; successive
    attempts to one address take successive outcomes, the last one repeating.
    Unmatched recipients are accepted."""

    def __init__(self, script: str = "") -> None:
        self._rules = parse_script(script)
        self._attempts: Counter[str] = Counter()
        #: Every accepted mail, oldest first.
        self.sent: list[Mail] = []

    async def send(self, mail: Mail) -> SendReceipt:
        address = mail.recipient.lower()
        outcomes: tuple[str, ...] = ("accept",)
        for pattern, sequence in self._rules:
            if fnmatch.fnmatchcase(address, pattern):
                outcomes = sequence
                break
        outcome = outcomes[min(self._attempts[address], len(outcomes) - 1)]
        self._attempts[address] += 1
        if outcome == "defer":
            raise SmtpDeferredError("421 stub: try again later", code=421)
        if outcome == "reject":
            raise SmtpRejectedError(
                "550 stub: mailbox unavailable", code=550, reason="recipient_rejected"
            )
        if outcome == "timeout":
            raise SmtpTimeoutError("stub: no reply")
        self.sent.append(mail)
        log.info("stub accepted mail %s for %s", mail.message_id, mail.recipient)
        return SendReceipt(250, "2.0.0 stub accepted")

    async def probe(self) -> None:
        return None

    async def close(self) -> None:
        return None
