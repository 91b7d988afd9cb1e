"""Structured logs: one JSON object per line, with the ids of what a line is about, and
email addresses redacted unless HERALD_LOG_ADDRESSES says otherwise.

Code that logs about a route passes its ids as ``extra`` (see :func:`route_fields`);
the JSON formatter lifts the known ones to top-level fields, so a log search for a
notification_id or trace_id finds every line about it.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from pipeline.contracts.records import ChannelRequest
from pipeline.settings import Settings

#: Fields a log record may carry (via ``extra``) that become top-level JSON fields.
CONTEXT_FIELDS = (
    "notification_id",
    "route_id",
    "trace_id",
    "attempt",
    "channel",
    "notification_type",
    "dead_letter_id",
)
_ADDRESS = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")


def redact(text: str) -> str:
    """``text`` with every email address reduced to its first letter and its domain."""
    return _ADDRESS.sub(r"\1***@\2", text)


def route_fields(request: ChannelRequest, attempt: int | None = None) -> dict[str, Any]:
    """The ``extra`` of a log line about one route."""
    return {
        "notification_id": request.notification_id,
        "route_id": request.route_id,
        "trace_id": request.trace_id,
        "attempt": request.attempt if attempt is None else attempt,
        "channel": request.channel,
        "notification_type": request.notification_type,
    }


class RedactAddresses(logging.Filter):
    """Rewrites a record's message with its email addresses redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class QuietRepeats(logging.Filter):
    """Lets one of a run of identical client-library lines through per ``window_s``.

    While the broker is away, aiokafka logs the same connection error thousands of
    times a second; the first line says it all. The next one let through carries
    how many were held back. Herald's own lines are never held back."""

    def __init__(
        self, window_s: float = 10.0, prefixes: tuple[str, ...] = ("aiokafka", "librdkafka")
    ) -> None:
        super().__init__()
        self._window_s = window_s
        self._prefixes = prefixes
        self._seen: dict[tuple[str, str], tuple[float | None, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        # The text, numbers aside ("after 0ms", ports): librdkafka logs everything
        # through one "%s [%s] %s" format.
        key = (record.name, re.sub(r"\d+", "#", record.getMessage()))
        last, held = self._seen.get(key, (None, 0))
        if last is not None and record.created - last < self._window_s:
            self._seen[key] = (last, held + 1)
            return False
        if len(self._seen) > 1000:  # messages with varying text: keep the map small
            self._seen.clear()
        self._seen[key] = (record.created, 0)
        if held:
            record.msg, record.args = f"{record.getMessage()} ({held} more like it held back)", None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, context, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def logging_config(settings: Settings) -> dict[str, Any]:
    """A logging.config.dictConfig for a Herald process."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"}
        if settings.log_format == "json"
        else {"format": "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"}
    )
    handler: dict[str, Any] = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "herald",
        "level": settings.log_level,
    }
    handler["filters"] = ["repeats"] if settings.log_addresses else ["repeats", "redact"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "redact": {"()": f"{__name__}.RedactAddresses"},
            "repeats": {"()": f"{__name__}.QuietRepeats"},
        },
        "formatters": {"herald": formatter},
        "handlers": {"default": handler},
        "root": {"level": settings.log_level, "handlers": ["default"]},
    }


def configure(settings: Settings) -> None:
    """Set up logging for a Herald process (the worker passes the config to Faust)."""
    import logging.config

    logging.config.dictConfig(logging_config(settings))


def librdkafka_logger(name: str) -> logging.Logger:
    """The Python logger a confluent-kafka client's own log goes to (its ``logger``
    setting), repeats held back like aiokafka's, instead of librdkafka printing every
    reconnect attempt to stderr."""
    logger = logging.getLogger(f"librdkafka.{name}")
    if not any(isinstance(f, QuietRepeats) for f in logger.filters):
        logger.addFilter(QuietRepeats())  # also where no logging config is set up (the CLI)
    return logger
