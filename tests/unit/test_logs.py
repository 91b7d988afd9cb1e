"""Structured logs: JSON lines with the route's ids, addresses redacted."""

from __future__ import annotations

import io
import json
import logging
import logging.config

from pipeline.contracts.records import ChannelRequest
from pipeline.logs import logging_config, redact, route_fields
from pipeline.settings import Settings


def capture(settings: Settings) -> tuple[logging.Logger, io.StringIO]:
    """A logger with the handler ``settings`` configure, writing to a string."""
    config = logging_config(settings)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.config.DictConfigurator(config).configure_formatter(config["formatters"]["herald"])
    )
    if "filters" in config["handlers"]["default"]:
        handler.addFilter(
            logging.config.DictConfigurator(config).configure_filter(config["filters"]["redact"])
        )
    logger = logging.getLogger(f"test.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_a_line_about_a_route_carries_its_ids_and_no_address(settings: Settings) -> None:
    logger, stream = capture(settings)
    request = ChannelRequest(
        route_id="r-1",
        notification_id="n-1",
        notification_type="game.turn.ready",
        channel="email",
        template_id="game.turn.ready",
        address="Player.One@example.org",
        trace_id="t-9",
        attempt=2,
    )
    logger.warning("route for %s failed", request.address, extra=route_fields(request, 3))
    line = json.loads(stream.getvalue())
    assert line["message"] == "route for P***@example.org failed"
    assert (line["notification_id"], line["route_id"], line["trace_id"]) == ("n-1", "r-1", "t-9")
    assert (line["attempt"], line["channel"], line["level"]) == (3, "email", "WARNING")
    assert "Player.One" not in stream.getvalue()


def test_addresses_in_full_and_text_format_when_asked(settings: Settings) -> None:
    logger, stream = capture(
        settings.model_copy(update={"log_addresses": True, "log_format": "text"})
    )
    logger.info("mail to a.b@example.org")
    assert stream.getvalue().rstrip().endswith("mail to a.b@example.org")
    assert (
        redact("x <someone@sub.example.co.uk>, y@z.io") == "x <s***@sub.example.co.uk>, y***@z.io"
    )
