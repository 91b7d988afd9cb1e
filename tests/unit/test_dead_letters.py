"""Every route that is given up on gets a dead letter that fits its topic (issue 14,
item 2): a mail near the 1 MB limit is dead-lettered with its history, the biggest
variable parts cut and named."""

from __future__ import annotations

import dataclasses

from pipeline.contracts import Contracts
from pipeline.contracts.records import Attachment, ChannelRequest, RenderedContent
from pipeline.errors import SmtpRejectedError
from pipeline.runtime.records import Out
from pipeline.settings import Settings
from pipeline.stages.deliveries import Deliveries
from tests.support import route
from tests.unit.helpers import raw, stage_context


def dead_letter_of(settings: Settings, request: ChannelRequest) -> tuple[list[Out], Contracts]:
    contracts = Contracts(settings)
    lane = raw(
        contracts.channel_request.encode(request),
        topic=settings.topic("notification.email.requested"),
        key=b"u1",
    )
    rejected = SmtpRejectedError("552 5.3.4 message too big for this mailbox", code=552)
    outs = Deliveries(stage_context(settings), "email").failed(lane, {}, request, 1, rejected)
    return outs, contracts


def test_a_mail_near_the_size_limit_is_dead_lettered_without_its_attachment_data() -> None:
    settings = Settings()
    big = Attachment(filename="report.pdf", data=b"%" * 990_000, content_type="application/pdf")
    request = dataclasses.replace(
        route("u1", "user1@example.org"),
        payload_mode="rendered",
        content=RenderedContent(subject="Report", text="See attached."),
        attachments=[big],
    )
    outs, contracts = dead_letter_of(settings, request)
    (letter_out,) = [o for o in outs if o.topic == settings.topic("notification.email.dlq")]
    assert letter_out.value is not None
    assert len(letter_out.value) <= settings.dead_letter_max_bytes
    letter = contracts.dead_letter.decode(letter_out.value)
    assert letter.truncated == "the data of 1 attachment(s) (990000 bytes)"
    assert [(a.number, a.code, a.reason) for a in letter.attempts] == [(1, 552, "smtp_rejected")]
    carried = contracts.channel_request.decode(letter.request)
    assert [(a.filename, a.data) for a in carried.attachments] == [("report.pdf", b"")]
    assert carried.content == request.content  # what fits is kept
    statuses = [contracts.status.decode(o.value or b"") for o in outs if "status" in o.topic]
    assert "dead_lettered" in [s.status for s in statuses]


def test_long_texts_are_capped_when_cutting_attachments_is_not_enough() -> None:
    settings = Settings(dead_letter_max_bytes=100_000)
    request = dataclasses.replace(
        route("u1", "user1@example.org"),
        payload_mode="rendered",
        content=RenderedContent(subject="Long", text="t" * 300_000, html="<p>" + "h" * 300_000),
    )
    outs, contracts = dead_letter_of(settings, request)
    (letter_out,) = [o for o in outs if o.topic.endswith("email.dlq")]
    assert letter_out.value is not None
    assert len(letter_out.value) <= 100_000
    letter = contracts.dead_letter.decode(letter_out.value)
    assert letter.truncated == "the rendered texts, each to 12500 characters"
    content = contracts.channel_request.decode(letter.request).content
    assert content is not None
    assert content.text.endswith("[... cut for the DLQ]")


def test_a_letter_that_fits_is_left_whole() -> None:
    settings = Settings()
    outs, contracts = dead_letter_of(settings, route("u1", "user1@example.org"))
    (letter_out,) = [o for o in outs if o.topic.endswith("email.dlq")]
    letter = contracts.dead_letter.decode(letter_out.value or b"")
    assert letter.truncated is None
