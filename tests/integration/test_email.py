"""The email channel in a real worker, against real SMTP servers (aiosmtpd) that accept,
defer, reject and stall: every route ends delivered once, suppressed, or
dead-lettered with its history."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.contracts import Contracts
from pipeline.contracts.records import (
    Attachment,
    DeadLetter,
    StatusEvent,
    UserProfile,
)
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.views import address_key
from tests.smtp import ScriptedSmtp, smtp_server
from tests.support import (
    TURN,
    WorkerProcess,
    fast_retries,
    publish_routes,
    read_all,
    route,
    wait_for,
)


@pytest.fixture
def fast_mail(isolated: Settings, tmp_path: Path) -> Settings:
    """Isolated settings whose email retries wait 1 s, then 2 s, for 3 attempts, with a
    2 s SMTP timeout."""
    return fast_retries(isolated, tmp_path / "topologies", "email", smtp_timeout_s=2.0)


SCRIPT = {
    "flaky@example.org": ["defer", "accept"],
    "busy@example.org": ["defer"],
    "gone@example.org": ["reject"],
    "slow@example.org": ["stall", "accept"],
}


@pytest.fixture
def smtp() -> Iterator[ScriptedSmtp]:
    yield from smtp_server(SCRIPT, stall_s=5.0)


@pytest.fixture
def mail_worker(fast_mail: Settings, smtp: ScriptedSmtp, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(
        fast_mail.model_copy(update={"smtp_port": smtp.port}), tmp_path / "worker.log"
    )
    process.start()
    yield process
    process.stop()


def route_statuses(events: list[StatusEvent], route_id: str) -> list[tuple[str, int, str | None]]:
    return [(e.status, e.attempt, e.reason) for e in events if e.route_id == route_id]


def test_every_route_ends_sent_suppressed_or_dead_lettered(
    fast_mail: Settings, smtp: ScriptedSmtp, mail_worker: WorkerProcess
) -> None:
    contracts = Contracts(fast_mail)
    routes = {
        "ok": route("u-ok", "ok@example.org"),
        "flaky": route("u-flaky", "flaky@example.org"),
        "busy": route("u-busy", "busy@example.org"),
        "gone": route("u-gone", "gone@example.org"),
        "slow": route("u-slow", "slow@example.org"),
        "novar": route("u-novar", "novar@example.org", variables_json=json.dumps({"game_id": "1"})),
        "inject": route(
            "u-inject",
            "inject@example.org",
            variables_json=json.dumps(
                {**TURN, "game_name": "X\r\nBcc: evil@example.org\r\nX-Evil: 1"}
            ),
        ),
    }
    publish_routes(fast_mail, contracts, list(routes.values()))

    terminal = {"sent", "dead_lettered", "suppressed"}
    events = wait_for(
        fast_mail,
        "notification.status",
        contracts.status,
        lambda evs: (
            {e.route_id for e in evs if e.status in terminal}
            >= {r.route_id for r in routes.values()}
        ),
        timeout_s=90,
        what="a terminal status for every route",
    )
    outcome = {name: route_statuses(events, r.route_id) for name, r in routes.items()}
    assert outcome["ok"] == [("rendered", 1, None), ("sent", 1, None)]
    assert outcome["flaky"] == [
        ("rendered", 1, None),
        ("failed", 1, "smtp_deferred"),
        ("retry_scheduled", 1, None),
        ("sent", 2, None),
    ]
    assert outcome["slow"][1:3] == [("failed", 1, "smtp_timeout"), ("retry_scheduled", 1, None)]
    assert outcome["slow"][-1] == ("sent", 2, None)
    assert outcome["busy"][-2:] == [
        ("failed", 3, "smtp_deferred"),
        ("dead_lettered", 3, "budget_exhausted"),
    ]
    assert outcome["gone"] == [
        ("rendered", 1, None),
        ("failed", 1, "recipient_rejected"),
        ("dead_lettered", 1, "permanent_failure"),
    ]
    assert outcome["novar"] == [
        ("failed", 1, "render_failed"),
        ("dead_lettered", 1, "permanent_failure"),
    ]

    # Exactly once at the server for everything that was delivered; nothing else.
    delivered = ["ok", "flaky", "slow", "inject"]
    for name in delivered:
        assert len(smtp.mails_to(routes[name].address or "")) == 1, name
    assert sorted(rcpt for rcpt, _ in smtp.received) == sorted(
        routes[n].address or "" for n in delivered
    )

    # The mail itself: headers Herald chose, localized text, html, deterministic id.
    mail = smtp.mails_to("ok@example.org")[0]
    assert mail["Message-ID"] == f"<{routes['ok'].route_id}@herald.invalid>"
    assert mail["From"] == "Herald <no-reply@herald.invalid>"
    assert mail["Subject"] == "Andromeda: turn 4 is ready"
    assert mail["Content-Language"] == "en"
    assert mail.get_content_type() == "multipart/alternative"
    plain = mail.get_body(("plain",))
    html = mail.get_body(("html",))
    assert plain is not None
    assert "turn 4" in plain.get_content()
    assert html is not None
    assert "Andromeda" in html.get_content()

    # A producer's line breaks never become headers.
    injected = smtp.mails_to("inject@example.org")[0]
    assert injected["Bcc"] is None
    assert injected["X-Evil"] is None
    assert "\n" not in str(injected["Subject"])
    assert "Bcc" in str(injected["Subject"])
    assert [rcpt for rcpt, _ in smtp.received].count("evil@example.org") == 0

    # Dead letters carry the request and every attempt.
    letters = {
        d.route_id: d for d in read_all(fast_mail, "notification.email.dlq", contracts.dead_letter)
    }
    busy: DeadLetter = letters[routes["busy"].route_id]
    assert (busy.reason, busy.error_class, busy.last_code) == ("budget_exhausted", "transient", 421)
    assert [(a.number, a.outcome, a.code) for a in busy.attempts] == [
        (1, "transient", 421),
        (2, "transient", 421),
        (3, "transient", 421),
    ]
    assert contracts.channel_request.decode(busy.request).address == "busy@example.org"
    gone = letters[routes["gone"].route_id]
    assert (gone.reason, gone.last_reason, gone.last_code) == (
        "permanent_failure",
        "recipient_rejected",
        550,
    )
    novar = letters[routes["novar"].route_id]
    assert novar.last_reason == "render_failed"
    assert "turn_number" in novar.last_error
    assert len(letters) == 3

    # The hard bounce put the address on the suppression list: the next route to it
    # is suppressed without an SMTP attempt.
    attempts_before = smtp.attempts["gone@example.org"]
    again = route("u-gone", "gone@example.org", notification_id="second")
    publish_routes(fast_mail, contracts, [again])
    events = wait_for(
        fast_mail,
        "notification.status",
        contracts.status,
        lambda evs: any(e.route_id == again.route_id and e.status == "suppressed" for e in evs),
        what="the suppressed route",
    )
    assert route_statuses(events, again.route_id) == [("suppressed", 0, "hard_bounce")]
    assert smtp.attempts["gone@example.org"] == attempts_before
    suppressions = read_all_raw(fast_mail, "notification.email.suppressions")
    assert address_key("gone@example.org") in suppressions


def read_all_raw(settings: Settings, logical_topic: str) -> dict[bytes, bytes | None]:
    from pipeline.ops.reader import read_topic

    return {
        key: value
        for *_, key, value in read_topic(settings, settings.topic(logical_topic))
        if key is not None
    }


def test_localized_mail_from_an_intent_with_rendered_mode_and_attachments(
    fast_mail: Settings, smtp: ScriptedSmtp, mail_worker: WorkerProcess
) -> None:
    contracts = Contracts(fast_mail)
    with HeraldProducer(fast_mail, contracts) as herald:
        herald.put_user(
            UserProfile(user_id="anna", email="anna@example.org", preferred_language="de")
        )
        herald.publish_intent(
            notification_type="game.turn.ready",
            producer="game-master",
            idempotency_key="turn-4",
            recipient_user_ids=["anna"],
            payload={**TURN, "game_name": "<b>A&B</b>"},
        )
        herald.send_email(
            producer="billing",
            idempotency_key="invoice-1",
            to="payer@example.org",
            subject="Your invoice",
            text="Attached.",
            html="<p>Attached.</p>",
            attachments=[
                Attachment(filename="invoice.pdf", content_type="application/pdf", data=b"%PDF-1")
            ],
        )
    smtp.wait_for(2)
    (anna,) = smtp.mails_to("anna@example.org")
    assert anna["Subject"] == "<b>A&B</b>: Zug 4 ist bereit"
    assert anna["Content-Language"] == "de"
    plain, html = anna.get_body(("plain",)), anna.get_body(("html",))
    assert plain is not None
    assert "<b>A&B</b>" in plain.get_content()
    assert html is not None
    assert "&lt;b&gt;A&amp;B&lt;/b&gt;" in html.get_content()
    assert "<b>A&B</b>" not in html.get_content()

    (invoice,) = smtp.mails_to("payer@example.org")
    assert invoice.get_content_type() == "multipart/mixed"
    (attachment,) = list(invoice.iter_attachments())
    assert attachment.get_filename() == "invoice.pdf"
    assert attachment.get_content() == b"%PDF-1"


def test_killed_worker_resends_nothing_the_server_accepted(
    fast_mail: Settings, tmp_path: Path
) -> None:
    """SIGKILL while the 16th route is in its SMTP transaction: the restarted worker
    re-reads the routes whose offsets were not committed (here: all of them), and the
    delivery registry keeps it from mailing any of the 15 the server already accepted."""
    contracts = Contracts(fast_mail)
    with ScriptedSmtp() as smtp:
        smtp.hold_at = 16
        settings = fast_mail.model_copy(update={"smtp_port": smtp.port})
        routes = [route(f"u{i}", f"user{i}@example.org") for i in range(40)]
        # The first worker commits nothing before it dies, so the second re-reads
        # every route and only the registry stands between them and a second mail.
        # One connection: routes go one at a time, so the 16th waits for the 15th.
        settings = settings.model_copy(update={"smtp_connections": 1})
        first = WorkerProcess(
            settings.model_copy(update={"commit_interval_s": 600.0}), tmp_path / "first.log"
        )
        first.start()
        try:
            publish_routes(settings, contracts, routes)
            assert smtp.held.wait(90), "the worker never reached the 16th route"
            assert len(smtp.received) == 15
        finally:
            first.kill()
        smtp.release.set()  # the held transaction ends without a mail

        second = WorkerProcess(settings, tmp_path / "second.log")
        second.start()
        try:
            smtp.wait_for(40, timeout_s=200)
            events = wait_for(
                settings,
                "notification.status",
                contracts.status,
                lambda evs: len({e.route_id for e in evs if e.status == "sent"}) == 40,
                what="40 sent routes",
            )
        finally:
            second.stop()
        ids = smtp.message_ids()
        assert len(ids) == 40, f"{len(ids) - len(set(ids))} mails were sent twice"
        assert set(ids) == {f"<{r.route_id}@herald.invalid>" for r in routes}
        sent = [e.route_id for e in events if e.status == "sent"]
        assert len(sent) == len(set(sent)) == 40
        assert second.log().count("already handled") >= 15
