"""Digests end to end, against a real worker, broker and SMTP server, across a worker
kill: every route is in exactly one digest mail, and each digest is mailed once."""

from __future__ import annotations

import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

from pipeline.contracts import Contracts
from pipeline.contracts.records import StatusEvent, UserProfile
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from tests.smtp import ScriptedSmtp
from tests.support import WorkerProcess, read_all, with_types

NEWS = {
    "category": "news",
    "channels": {"user": ["email"]},
    "required": {"headline": "string"},
    "digest": {"window": "6s", "max_items": 3},
}
TEMPLATES = {
    "news.item": {"subject": "{{ headline }}", "text": "{{ headline }}"},
    "news.item.digest": {
        "subject": "{{ count }} stories",
        "text": "{% for item in items %}* {{ item.headline }}\n{% endfor %}",
    },
}


def publish(settings: Settings, contracts: Contracts, numbers: range) -> None:
    with HeraldProducer(settings, contracts) as herald:
        for n in numbers:
            herald.publish_intent(
                notification_type="news.item",
                producer="press",
                idempotency_key=f"story-{n}",
                recipient_user_ids=["reader"],
                payload={"headline": f"story {n}"},
            )


def stories(mails: list[EmailMessage]) -> list[str]:
    """The stories listed in ``mails``' bodies."""
    lines = []
    for mail in mails:
        body = mail.get_body(("plain",))
        assert body is not None
        lines += [line[2:] for line in str(body.get_content()).splitlines() if line]
    return lines


def until(
    settings: Settings,
    contracts: Contracts,
    done: Callable[[list[StatusEvent]], bool],
    timeout_s: float = 60,
) -> list[StatusEvent]:
    deadline = time.monotonic() + timeout_s
    while True:
        events = read_all(settings, "notification.status", contracts.status)
        if done(events):
            return events
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


def test_digests_hold_every_route_once_across_a_worker_kill(
    isolated: Settings, tmp_path: Path
) -> None:
    contracts = Contracts(isolated)
    with ScriptedSmtp() as smtp:
        settings = with_types(
            isolated, tmp_path, {"news.item": NEWS}, TEMPLATES, smtp_port=smtp.port
        )
        first = WorkerProcess(settings, tmp_path / "first.log")
        first.start()
        with HeraldProducer(settings, contracts) as herald:
            herald.put_user(UserProfile(user_id="reader", email="reader@example.org"))
        time.sleep(1.0)
        publish(settings, contracts, range(1, 3))
        until(settings, contracts, lambda evs: sum(e.status == "digested" for e in evs) == 2)
        first.kill()  # two routes folded, their digest open, its close marker waiting
        publish(settings, contracts, range(3, 5))
        second = WorkerProcess(settings, tmp_path / "second.log")
        second.start()
        try:
            # However the windows fall (the first may close before the new worker is
            # up), the four stories arrive in digests.
            deadline = time.monotonic() + 90
            while len(stories(smtp.mails_to("reader@example.org"))) < 4:
                assert time.monotonic() < deadline, "the stories never all arrived"
                time.sleep(0.3)
            time.sleep(8.0)  # every window's marker has returned: nothing more is mailed
        finally:
            second.stop()
        mails = smtp.mails_to("reader@example.org")
    events = read_all(settings, "notification.status", contracts.status)
    # Each story in exactly one mail; each mail says how many it holds.
    assert sorted(stories(mails)) == [f"story {n}" for n in range(1, 5)]
    for mail in mails:
        assert str(mail["Subject"]) == f"{len(stories([mail]))} stories"
    digested = [e for e in events if e.status == "digested"]
    assert sorted(e.idempotency_key or "" for e in digested) == [f"story-{n}" for n in range(1, 5)]
    assert len({e.route_id for e in digested}) == 4  # each route once
    digests = {e.detail for e in digested}
    assert len(digests) == len(mails)
    sent = [e for e in events if e.status == "sent"]
    assert sorted(e.route_id or "" for e in sent) == sorted(d or "" for d in digests)
