"""Email building blocks without a broker: templates, MIME, providers' outcome classes,
the delivery registry's rules and the login-code request contract."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import pytest

from pipeline.contracts import Contracts
from pipeline.contracts.avro import AvroCodec, load_schema
from pipeline.contracts.records import Attachment, ChannelRequest
from pipeline.errors import (
    ConfigurationError,
    InvalidAddressError,
    RenderError,
    SmtpDeferredError,
    SmtpRejectedError,
    SmtpTimeoutError,
    ValidationError,
)
from pipeline.providers.mime import Mail, MailWriter, checked_address
from pipeline.providers.smtp import classify_reply
from pipeline.providers.stub import StubEmailProvider, parse_script
from pipeline.rendering import TemplateCatalog
from pipeline.settings import Settings
from pipeline.stages.deliveries import already_handled, expired_entries
from pipeline.topology import Catalog
from pipeline.web.login_codes import parse_request

TURN = {"game_id": "g-1", "game_name": "Andromeda", "turn_number": 4}


@pytest.fixture(scope="module")
def templates() -> TemplateCatalog:
    return TemplateCatalog(Settings().templates_dir)


def test_every_email_type_has_en_templates_that_render(templates: TemplateCatalog) -> None:
    catalog = Catalog.load(Settings())
    email_types = [
        spec for spec in catalog.types.values() if any("email" in c for c in spec.channels.values())
    ]
    assert len(email_types) >= 12
    for spec in email_types:
        variables = {name: f"<{name}>" for name in spec.required}
        mail = templates.render_mail(spec.name, "en", variables, spec.required)
        assert mail.subject, spec.name
        assert "\n" not in mail.subject, spec.name
        assert mail.html is not None, spec.name
        for name in spec.required:
            assert f"<{name}>" in mail.text, (spec.name, name)
            assert f"<{name}>" not in mail.html, (spec.name, name)  # autoescaped


def test_locale_fallback_and_strict_variables(templates: TemplateCatalog) -> None:
    german = templates.render_mail("game.turn.ready", "de", TURN)
    assert (german.locale, german.locale_fallback) == ("de", False)
    assert german.subject == "Andromeda: Zug 4 ist bereit"
    french = templates.render_mail("game.turn.ready", "fr", TURN)
    assert (french.locale, french.locale_fallback) == ("en", True)
    with pytest.raises(RenderError, match="turn_number"):
        templates.render_mail("game.turn.ready", "en", {"game_id": "1", "game_name": "x"})
    with pytest.raises(RenderError, match="missing required"):
        templates.render_mail("game.turn.ready", "en", {}, ["game_id"])
    with pytest.raises(RenderError, match="no mail template"):
        templates.render_mail("no.such.type", "en", {})


def test_the_sandbox_refuses_template_code(tmp_path: Path) -> None:
    folder = tmp_path / "t" / "en"
    folder.mkdir(parents=True)
    (folder / "subject.j2").write_text("{{ x.__class__.__mro__ }}")
    (folder / "text.j2").write_text("body")
    with pytest.raises(RenderError):
        TemplateCatalog(tmp_path).render_mail("t", "en", {"x": "a"})
    (folder / "text.j2").write_text("{% if %}")
    with pytest.raises(ConfigurationError, match=r"text\.j2"):
        TemplateCatalog(tmp_path)


def test_message_headers_come_from_herald_only() -> None:
    settings = Settings(smtp_reply_to="help@herald.invalid")
    mail = MailWriter(settings).build(
        route_id="r-1",
        notification_id="n-1",
        notification_type="game.turn.ready",
        to="a@example.org",
        subject="Hi\r\nBcc: evil@example.org",
        text="body",
        html="<p>body</p>",
        locale="de",
        attachments=[Attachment(filename="../x\r\n.pdf", data=b"1", content_type="bad type")],
        now_ms=1_700_000_000_000,
    )
    message = parsed(mail)
    assert message["Subject"] == "Hi Bcc: evil@example.org"
    assert message["Bcc"] is None
    assert message["Message-ID"] == "<r-1@herald.invalid>"
    assert message["Reply-To"] == "help@herald.invalid"
    assert message["Content-Language"] == "de"
    (attachment,) = message.iter_attachments()
    assert attachment.get_content_type() == "application/octet-stream"
    assert attachment.get_filename() == ".._x.pdf"
    for bad in ["a@example.org\r\nBcc: b@example.org", "A <a@example.org>", "nodomain", "", "a@b"]:
        with pytest.raises(InvalidAddressError):
            checked_address(bad)


def parsed(mail: Mail) -> EmailMessage:
    message = message_from_bytes(mail.data, policy=default)
    assert isinstance(message, EmailMessage)
    return message


def lines_of(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


SUBJECTS = [
    "Your turn",
    "A subject of many words " * 8,
    "Grüße aus Köln \u2013 dein Zug 🎉 " * 4,
    "Looks like =?utf-8?q?an_encoded_word?= but is text",
    "x" * 300,
    "y" * 2000,  # longer than a header line may be: split into encoded words
]
TEXTS = ["", "line\r\nnext\rlast  \n.\n", "Zug für Anna\n" + "y" * 500, "a = b =_ c\t\n"]
FILES = [
    Attachment(
        filename="report.pdf", data=b"%PDF-1.4 \x00\xff" * 50, content_type="application/pdf"
    ),
    Attachment(
        filename='Bericht "Q3" \u2013 Köln ' * 9 + ".txt", data=b"", content_type="text/plain"
    ),
]


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("html", [None, "<p>Hallo Jürgen</p>\n"])
@pytest.mark.parametrize("attachments", [[], FILES])
def test_the_standard_parser_reads_back_what_was_written(
    subject: str, text: str, html: str | None, attachments: list[Attachment]
) -> None:
    settings = Settings(smtp_from="Hérald Bot <bot@herald.invalid>")
    mail = MailWriter(settings).build(
        route_id="r-1",
        notification_id="n-1",
        notification_type="game.turn.ready",
        to="a@example.org",
        subject=subject,
        text=text,
        html=html,
        locale="de-AT",
        attachments=attachments,
        now_ms=1_700_000_000_000,
    )
    assert all(len(line) <= 998 for line in mail.data.split(b"\r\n"))
    assert b"\n" not in mail.data.replace(b"\r\n", b"")
    assert mail.data.isascii()
    message = parsed(mail)
    assert [part.defects for part in message.walk()] == [[]] * len(list(message.walk()))
    assert message["Subject"] == " ".join(subject.split())
    assert message["From"] == "Hérald Bot <bot@herald.invalid>"
    assert message["To"] == mail.recipient == "a@example.org"
    assert message["Message-ID"] == mail.message_id == "<r-1@herald.invalid>"
    assert message["Content-Language"] == "de-AT"
    expected = lines_of(text) if lines_of(text).endswith("\n") else lines_of(text) + "\n"
    plain = message.get_body(("plain",))
    assert plain is not None
    assert lines_of(plain.get_content()) == expected
    body = message.get_body(("html",))
    assert (body is None) == (html is None)
    if body is not None:
        assert lines_of(body.get_content()) == html
    found = [
        (a.get_filename(), a.get_content_type(), a.get_content())
        for a in message.iter_attachments()
    ]
    assert found == [
        (a.filename.strip(), a.content_type, a.data if a.content_type != "text/plain" else "")
        for a in attachments
    ]


def test_only_plain_ascii_mailboxes_are_addressed() -> None:
    for bad in ["jürgen@example.org", "a@exämple.org"]:
        with pytest.raises(InvalidAddressError, match="ASCII"):
            checked_address(bad)


def test_outcome_classes_are_error_types() -> None:
    assert isinstance(classify_reply(421, "busy"), SmtpDeferredError)
    rejected = classify_reply(550, "no such user", recipient=True)
    assert isinstance(rejected, SmtpRejectedError)
    assert (rejected.transient, rejected.code, rejected.reason) == (
        False,
        550,
        "recipient_rejected",
    )
    assert classify_reply(554, "spam").reason == "smtp_rejected"
    assert SmtpTimeoutError().transient


def test_stub_provider_follows_its_script(settings: Settings) -> None:
    stub = StubEmailProvider("*@flaky.invalid=defer,accept; bounce@*=reject; slow@*=timeout")
    message = MailWriter(settings).build(
        route_id="r",
        notification_id="n",
        notification_type="t",
        to="x@flaky.invalid",
        subject="s",
        text="t",
        html=None,
        locale="en",
        now_ms=0,
    )

    async def attempts(address: str, count: int) -> list[str]:
        out = []
        for _ in range(count):
            try:
                await stub.send(dataclasses.replace(message, recipient=address))
                out.append("accepted")
            except (SmtpDeferredError, SmtpRejectedError, SmtpTimeoutError) as exc:
                out.append(exc.reason)
        return out

    assert asyncio.run(attempts("x@flaky.invalid", 3)) == ["smtp_deferred", "accepted", "accepted"]
    assert asyncio.run(attempts("bounce@example.org", 1)) == ["recipient_rejected"]
    assert asyncio.run(attempts("slow@example.org", 1)) == ["smtp_timeout"]
    assert asyncio.run(attempts("ok@example.org", 1)) == ["accepted"]
    assert len(stub.sent) == 3
    with pytest.raises(ConfigurationError):
        parse_script("*=explode")


def request(attempt: int = 0, replay_of: str | None = None) -> ChannelRequest:
    return ChannelRequest(
        route_id="r",
        notification_id="n",
        notification_type="t",
        channel="email",
        template_id="t",
        attempt=attempt,
        replay_of=replay_of,
    )


def test_registry_rules() -> None:
    assert not already_handled(None, request())
    assert already_handled({"state": "sent", "attempts": 1}, request(2))
    assert already_handled({"state": "suppressed", "attempts": 0}, request())
    # A stale copy of an attempt that was made already (its retry is on its way).
    assert already_handled({"state": "retrying", "attempts": 2}, request(1))
    assert not already_handled({"state": "retrying", "attempts": 2}, request(2))
    assert already_handled({"state": "dead_lettered", "attempts": 7}, request(6))
    # A replay of a dead letter starts a new chain; a repeat of that replay does not.
    assert not already_handled({"state": "dead_lettered", "attempts": 7}, request(0, "dl-1"))
    assert already_handled(
        {"state": "dead_lettered", "attempts": 1, "replay_of": "dl-1"}, request(0, "dl-1")
    )


def test_version_1_routes_still_decode(settings: Settings) -> None:
    contracts = Contracts(settings)
    v1_schema = load_schema(settings.schemas_dir, "history/herald.ChannelRequest/v1.avsc")
    v1 = AvroCodec(contracts.registry, v1_schema)
    data = request().to_avro()
    for name in ("payload_mode", "content", "attachments", "attempts", "replay_of"):
        data.pop(name)
    decoded = contracts.channel_request.decode(v1.encode(data))
    assert (decoded.route_id, decoded.payload_mode, decoded.attempts) == ("r", "template", [])


def test_login_code_requests_are_strict() -> None:
    body = json.dumps({"email": "a@example.org", "code": "123456", "locale": "pt-BR"}).encode()
    key, parsed = parse_request("k", body)
    assert (key, parsed.locale) == ("k", "pt-BR")
    same = parse_request(
        "k", json.dumps({"email": "A@example.org", "code": "123456", "locale": "PT-br"}).encode()
    )[1]
    assert same.fingerprint() == parsed.fingerprint()
    for bad_key, bad_body in [
        (None, body),
        ("with space", body),
        ("k", b"[]"),
        ("k", json.dumps({"email": "a@example.org", "code": "1", "locale": "en", "x": 1}).encode()),
        ("k", json.dumps({"email": "a@example.org", "code": 1, "locale": "en"}).encode()),
        ("k", json.dumps({"email": "a@example.org", "code": "1", "locale": "english!"}).encode()),
    ]:
        with pytest.raises(ValidationError):
            parse_request(bad_key, bad_body)


def test_registry_entries_expire_with_tombstones_on_their_partition() -> None:
    registry = {
        b"old": json.dumps({"state": "sent", "attempts": 1, "at": 1_000, "p": 4}).encode(),
        b"new": json.dumps({"state": "sent", "attempts": 1, "at": 9_000, "p": 2}).encode(),
    }
    tombstones = expired_entries(registry, "changelog", window_ms=5_000, now_ms=10_000)
    assert [(t.topic, t.key, t.value, t.partition) for t in tombstones] == [
        ("changelog", b"old", None, 4)
    ]
    assert list(registry) == [b"new"]
