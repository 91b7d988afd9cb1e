"""Structured logs: JSON lines with the route's ids, addresses redacted."""

from __future__ import annotations

import io
import json
import logging
import logging.config

from pipeline.contracts.records import ChannelRequest
from pipeline.logs import QuietRepeats, logging_config, redact, route_fields
from pipeline.settings import Settings


def capture(settings: Settings) -> tuple[logging.Logger, io.StringIO]:
    """A logger with the handler ``settings`` configure, writing to a string."""
    config = logging_config(settings)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        logging.config.DictConfigurator(config).configure_formatter(config["formatters"]["herald"])
    )
    for name in config["handlers"]["default"].get("filters", []):
        handler.addFilter(
            logging.config.DictConfigurator(config).configure_filter(config["filters"][name])
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


def test_a_flood_of_identical_client_lines_is_held_back_and_counted() -> None:
    quiet = QuietRepeats(window_s=10)

    def line(name: str, at: float, msg: str = "Unable connect to node %s") -> logging.LogRecord:
        record = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, ("1",), None)
        record.created = at
        return record

    assert quiet.filter(line("aiokafka", 0.0))
    assert not any(quiet.filter(line("aiokafka", 0.001 * i)) for i in range(1, 500))
    assert quiet.filter(line("aiokafka", 0.5, "Unable to update metadata from %s"))  # another
    again = line("aiokafka", 11.0)
    assert quiet.filter(again)
    assert again.getMessage() == "Unable connect to node 1 (499 more like it held back)"
    assert all(quiet.filter(line("pipeline.worker", 11.0)) for _ in range(3))  # our own
