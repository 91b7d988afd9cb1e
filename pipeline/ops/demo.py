"""`herald demo`: one intent's journey through a running worker, told step by step."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable

from confluent_kafka import Producer

from pipeline.contracts import Contracts
from pipeline.contracts import push as push_payloads
from pipeline.contracts.records import PushDevice, UserProfile
from pipeline.errors import HeraldError
from pipeline.ops.reader import read_topic
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings

_TYPE = "game.turn.ready"
_PRODUCER = "herald-demo"


def run_demo(settings: Settings, timeout_s: float, echo: Callable[[str], None]) -> bool:
    """Publish a valid intent, its duplicate, a conflicting one and garbage; report the
    outcomes the worker wrote. False if they did not all arrive within ``timeout_s``."""
    contracts = Contracts(settings)
    key = f"demo-{uuid.uuid4().hex[:10]}"
    payload = {"game_id": "g-7", "game_name": "Andromeda", "turn_number": 42}
    garbage = f"not avro at all ({key})".encode()

    with HeraldProducer(settings, contracts) as herald:
        herald.put_user(
            UserProfile(
                user_id="demo-alice",
                email="alice@example.org",
                preferred_language="de",
                push_devices=[PushDevice(token="alice-phone", platform="ios")],
            )
        )
        herald.put_user(
            UserProfile(user_id="demo-bob", email="bob@example.org", preferred_language="fr")
        )
        echo("published  users demo-alice (email, push device, de) and demo-bob (email, fr)")
        sent = herald.publish_intent(
            notification_type=_TYPE,
            producer=_PRODUCER,
            idempotency_key=key,
            recipient_user_ids=["demo-alice", "demo-bob"],
            payload=payload,
            request_id="req-1",
        )
        echo(f"published  intent {_PRODUCER}:{key} ({_TYPE} to demo-alice, demo-bob)")
        herald.publish(sent.__class__(**{**sent.to_avro(), "request_id": "req-2"}))
        echo("published  the same intent again (a producer retry)")
        herald.publish_intent(
            notification_type=_TYPE,
            producer=_PRODUCER,
            idempotency_key=key,
            recipient_user_ids=["demo-alice"],
            payload={**payload, "turn_number": 43},
        )
        echo("published  a different intent under the same key")
    plain = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    plain.produce(settings.topic("notification.intents"), value=garbage)
    plain.flush(15)
    echo("published  raw garbage bytes with a plain producer")

    deadline = time.monotonic() + timeout_s
    wanted = {"accepted", "duplicate", "rejected_conflict"}
    notification_id = None
    while wanted and time.monotonic() < deadline:
        for *_, value in read_topic(settings, settings.topic("notification.status")):
            event = contracts.status.decode(value)
            if event.idempotency_key == key and event.status in wanted:
                wanted.discard(event.status)
                notification_id = notification_id or event.notification_id
                echo(
                    f"status     {event.status:18} notification={event.notification_id} "
                    f"{event.reason or ''}"
                )
        if wanted:
            time.sleep(0.5)
    if wanted:
        return False

    for _, _, _, rkey, value in read_topic(settings, settings.topic("notification.recipients")):
        recipient = contracts.recipient.decode(value)
        if recipient.notification_id == notification_id:
            echo(f"recipient  {recipient.user_id} (key {rkey!r}) on notification.recipients")

    routes: set[tuple[str | None, str | None]] = set()
    while len(routes) < 4 and time.monotonic() < deadline:
        for *_, value in read_topic(settings, settings.topic("notification.status")):
            event = contracts.status.decode(value)
            where = (event.user_id, event.channel)
            if event.notification_id == notification_id and event.channel and where not in routes:
                routes.add(where)
                echo(
                    f"route      {event.status:9} {event.channel:5} {event.user_id} "
                    f"{event.reason or event.detail or ''}"
                )
        if len(routes) < 4:
            time.sleep(0.5)
    if len(routes) < 4:
        return False

    # Two mails and alice's push; a channel's last word on a route ends its wait.
    final = {"email": ("sent", "dead_lettered"), "push": ("published", "expired", "dead_lettered")}
    delivered: set[tuple[str | None, str | None]] = set()
    while len(delivered) < 3 and time.monotonic() < deadline:
        for *_, value in read_topic(settings, settings.topic("notification.status")):
            event = contracts.status.decode(value)
            where = (event.user_id, event.channel)
            if (
                event.notification_id == notification_id
                and event.status in final.get(event.channel or "", ())
                and where not in delivered
            ):
                delivered.add(where)
                echo(
                    f"{event.channel:10} {event.status:9} {event.user_id} attempt {event.attempt}: "
                    f"{event.detail or event.reason or ''}"
                )
        if len(delivered) < 3:
            time.sleep(0.5)
    if len(delivered) < 3:
        return False
    for *_, value in read_topic(settings, settings.gateway_topic_name):
        with contextlib.suppress(HeraldError):
            pushed = push_payloads.decode(value)
            if pushed.notification_id == notification_id:
                echo(
                    f"gateway    {pushed.user_id} {pushed.body_table} {json.dumps(pushed.body)} "
                    f"{pushed.display.title!r}: {pushed.display.body!r}"
                )

    while time.monotonic() < deadline:
        for *_, value in read_topic(settings, settings.topic("notification.intents.malformed")):
            bad = contracts.malformed.decode(value)
            if bad.raw_value == garbage:
                echo(
                    f"malformed  reason={bad.reason} origin={bad.origin_topic}"
                    f"[{bad.origin_partition}]@{bad.origin_offset}: {bad.detail}"
                )
                return True
        time.sleep(0.5)
    return False
