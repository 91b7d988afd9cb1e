"""The producer side: how services hand Herald an intent (and the user service a profile).

    from pipeline.producer import HeraldProducer
    with HeraldProducer(Settings()) as herald:
        herald.publish_intent(
            notification_type="game.turn.ready", producer="game-master",
            idempotency_key="turn-42-game-7", recipient_user_ids=["u1", "u2"],
            payload={"game_id": "7", "game_name": "Andromeda", "turn_number": 42},
        )

``publish_intent`` returns once Kafka has acknowledged the record (acks=all) unless
``wait=False``; call :meth:`HeraldProducer.flush` after a burst of those.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, NotRequired, Self, TypedDict, Unpack

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from pipeline import tracing
from pipeline.contracts import Contracts
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import (
    Attachment,
    ChannelRequest,
    DeviceFeedback,
    Intent,
    RenderedContent,
    UserProfile,
    intent_key,
)
from pipeline.errors import BrokerUnavailableError, RecordTooLargeError, ValidationError
from pipeline.logs import librdkafka_logger
from pipeline.providers.mime import checked_address
from pipeline.settings import Settings
from pipeline.stages.users import check_profile
from pipeline.topology import Topology
from pipeline.topology.partitioning import CONFLUENT_PARTITIONER

#: notification_type of mails sent with :meth:`HeraldProducer.send_email`.
RENDERED_TYPE = "email.rendered"


#: The bootstrap of the local broker scripts/kafka-local starts (the default).
LOCAL_BOOTSTRAPS = frozenset({"127.0.0.1:9092", "localhost:9092"})


class IntentFields(TypedDict):
    """What a producer says in an intent (schemas/intent.avsc)."""

    notification_type: str
    """A type of topologies/catalog.yaml."""
    producer: str
    """The publishing service; with the key, the idempotency scope."""
    idempotency_key: str
    """The producer's key: a retry sends the same intent with the same key."""
    recipient_user_ids: NotRequired[Iterable[str]]
    """Recipients (audience user)."""
    audience_kind: NotRequired[str]
    """"user" (default) or "admin_email"."""
    payload: NotRequired[Mapping[str, Any] | None]
    """The type's fields, a JSON object."""
    occurred_at_ms: NotRequired[int | None]
    """When it happened; default now. A retry passes its first try's."""
    request_id: NotRequired[str | None]
    """The caller's request id (status lookups)."""
    trace_id: NotRequired[str | None]
    """A trace id carried to every record of the notification."""
    tenant_id: NotRequired[str | None]
    """The tenant, where there are several."""
    priority: NotRequired[str]
    """"normal" (default) or "high"; a type may raise it."""


def build_intent(**fields: Unpack[IntentFields]) -> Intent:
    """An intent envelope. ValidationError when the payload is not a mapping (a JSON
    object): intake would refuse it, and Python callers get told here."""
    payload = fields.get("payload")
    if payload is not None and not isinstance(payload, Mapping):
        raise ValidationError(
            f"the payload must be a JSON object, not {type(payload).__name__}",
            reason="payload_not_json_object",
        )
    return Intent(
        notification_type=fields["notification_type"],
        producer=fields["producer"],
        audience_kind=fields.get("audience_kind", "user"),
        recipient_user_ids=list(fields.get("recipient_user_ids", ())),
        idempotency_key=fields["idempotency_key"],
        occurred_at_ms=fields.get("occurred_at_ms") or int(time.time() * 1000),
        request_id=fields.get("request_id"),
        trace_id=fields.get("trace_id"),
        tenant_id=fields.get("tenant_id"),
        priority=fields.get("priority", "normal"),
        payload_json=json.dumps(dict(payload or {}), separators=(",", ":"), ensure_ascii=False),
    )


class HeraldProducer:
    """Publishes Avro intents and user profiles with the partitioning Herald expects."""

    def __init__(
        self, settings: Settings, contracts: Contracts | None = None, **producer_config: Any
    ) -> None:
        self._settings = settings
        self._contracts = contracts or Contracts(settings)
        config: dict[str, Any] = {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "acks": "all",
            "enable.idempotence": True,
            "partitioner": CONFLUENT_PARTITIONER,
            "linger.ms": 5,
            "logger": librdkafka_logger("producer"),
        }
        config.update(producer_config)
        self._producer = Producer(config)
        self._errors: list[str] = []
        self._too_large: list[str] = []
        self._intents_topic = settings.topic("notification.intents")
        self._users_topic = settings.topic("notification.users")

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                self._too_large.append(f"{msg.topic()}: {len(msg.value() or b'')} bytes")
            else:
                self._errors.append(f"{msg.topic()}: {err}")

    def _produce(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        wait: bool,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=list(headers) or None,
                    on_delivery=self._on_delivery,
                )
                break
            except BufferError:  # local queue full: let deliveries drain
                self._producer.poll(0.1)
            except KafkaException as exc:
                if exc.args and exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise RecordTooLargeError(
                        f"{topic}: a record of {len(value or b'')} bytes is over the "
                        "producer's limit (message.max.bytes, 1 MB by default)"
                    ) from None
                raise BrokerUnavailableError(f"{topic}: {exc}") from exc
        self._producer.poll(0)
        if wait:
            self.flush()

    def publish_intent(self, *, wait: bool = True, **fields: Unpack[IntentFields]) -> Intent:
        """Publish one intent keyed by ``<producer>:<idempotency_key>``; returns it.
        ``fields`` are :func:`build_intent`'s."""
        intent = build_intent(**fields)
        self.publish(intent, wait=wait)
        return intent

    def publish(self, intent: Intent, *, wait: bool = True) -> None:
        """Publish an already-built intent, with the caller's OpenTelemetry span context
        (W3C traceparent) when it has one: Herald's spans join the caller's trace."""
        value = self._contracts.intent.encode(intent)
        key = intent.idempotency_id.encode("utf-8")
        self._produce(self._intents_topic, key, value, wait, tracing.current_headers())

    def send_email(
        self,
        *,
        producer: str,
        idempotency_key: str,
        to: str,
        subject: str,
        text: str,
        html: str | None = None,
        attachments: Sequence[Attachment] = (),
        locale: str = "en",
        priority: str = "normal",
        request_id: str | None = None,
        trace_id: str | None = None,
        wait: bool = True,
    ) -> ChannelRequest:
        """Send a mail the caller rendered itself (payload mode ``rendered``) straight to
        the email channel: no catalog type, no user lookup. Suppression, retries, the
        DLQ and the never-twice registry apply as to every route; the route id comes
        from (producer, idempotency_key, to), so a retried call never mails twice."""
        address = checked_address(to.strip())
        notification_id = deterministic_id(intent_key(producer, idempotency_key))
        now = int(time.time() * 1000)
        request = ChannelRequest(
            route_id=deterministic_id(notification_id, "email", address.lower()),
            notification_id=notification_id,
            notification_type=RENDERED_TYPE,
            channel="email",
            template_id=RENDERED_TYPE,
            address=address,
            locale=locale,
            priority=priority,
            payload_mode="rendered",
            content=RenderedContent(subject=subject, text=text, html=html),
            attachments=list(attachments),
            occurred_at_ms=now,
            produced_at_ms=now,
            request_id=request_id,
            trace_id=trace_id,
        )
        lane = Topology.load(self._settings).channel("email").lane_for(priority)
        self._produce(
            self._settings.topic(lane),
            request.record_key(),
            self._contracts.channel_request.encode(request),
            wait,
        )
        return request

    def put_user(self, profile: UserProfile, *, wait: bool = True) -> None:
        """Publish a user profile to the compacted users topic; ValidationError (with
        the reason) for a profile Herald would refuse (stages.users.check_profile)."""
        check_profile(profile)
        value = self._contracts.user.encode(profile)
        self._produce(self._users_topic, profile.user_id.encode("utf-8"), value, wait)

    def delete_user(self, user_id: str, *, wait: bool = True) -> None:
        """Publish a tombstone: the user is forgotten."""
        self._produce(self._users_topic, user_id.encode("utf-8"), None, wait)

    def report_invalid_token(
        self,
        user_id: str,
        token: str,
        reason: str = "invalid_token",
        *,
        platform: str | None = None,
        wait: bool = True,
    ) -> None:
        """Report a dead push token as the client gateway does (gateway.device-feedback):
        later push routes of ``user_id`` no longer target it."""
        report = DeviceFeedback(
            user_id=user_id,
            token=token,
            reason=reason,
            platform=platform,
            reported_at_ms=int(time.time() * 1000),
        )
        self._produce(
            self._settings.topic("gateway.device-feedback"),
            user_id.encode("utf-8"),
            self._contracts.device_feedback.encode(report),
            wait,
        )

    def write(
        self, topic: str, key: bytes | None, value: bytes | None, *, wait: bool = True
    ) -> None:
        """Write one already-encoded record to a physical topic (operator tools)."""
        self._produce(topic, key or b"", value, wait)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every record is acknowledged; BrokerUnavailableError if any was not."""
        remaining = self._producer.flush(timeout_s)
        too_large, self._too_large = self._too_large, []
        if too_large:
            raise RecordTooLargeError(
                "over the broker's size limit (max.message.bytes): " + "; ".join(too_large[:5])
            )
        errors, self._errors = self._errors, []
        if remaining:
            errors.append(f"{remaining} record(s) not acknowledged within {timeout_s}s")
        if errors:
            hint = ""
            if self._settings.kafka_bootstrap_servers in LOCAL_BOOTSTRAPS:
                hint = " (is the local broker running? `scripts/kafka-local start`)"
            raise BrokerUnavailableError("; ".join(errors[:5]) + hint)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()
