"""Herald's exceptions.

Every error Herald raises derives from :class:`HeraldError`. Whether a failure is
worth retrying is a property of its type (:attr:`HeraldError.transient`), never a
guess from the message text.
"""

from __future__ import annotations


class HeraldError(Exception):
    """Root of every error Herald raises on purpose."""

    #: True when the same operation may succeed if tried again later.
    transient: bool = False
    #: Machine-readable reason, stable across releases (used in topics and metrics).
    reason: str = "error"
    #: True when the failure says the remote server is unreachable or unresponsive (as
    #: opposed to a reply about one message): what the circuit breaker counts.
    server_unavailable: bool = False
    #: Seconds the remote side asked Herald to wait before trying again (Retry-After),
    #: when it said; a retry is never scheduled sooner.
    retry_after_s: float | None = None

    def __init__(
        self, detail: str = "", *, reason: str | None = None, code: int | None = None
    ) -> None:
        super().__init__(detail or self.__class__.__doc__ or self.reason)
        self.detail = detail or str(self)
        if reason is not None:
            self.reason = reason
        #: The remote side's reply code (SMTP), when the failure came with one.
        self.code = code


class TransientError(HeraldError):
    """A failure that may clear by itself (broker unavailable, timeout, 4xx SMTP)."""

    transient = True
    reason = "transient"


class PermanentError(HeraldError):
    """A failure that retrying will not fix (bad input, 5xx SMTP, render failure)."""

    reason = "permanent"


class ConfigurationError(PermanentError):
    """Settings, topology, catalog or schema files are inconsistent or unreadable."""

    reason = "configuration"


class KafkaDeliveryError(TransientError):
    """Kafka did not acknowledge one of Herald's own writes (the sink sends it again)."""

    reason = "kafka_delivery"


class FaustSeamError(ConfigurationError):
    """The installed faust-streaming lacks an internal that Herald's runtime relies on."""

    reason = "faust_seam"


class DecodeError(PermanentError):
    """Bytes that are not a Confluent-framed Avro record of a known schema."""

    reason = "undecodable"


class UnknownSchemaError(DecodeError):
    """The record names a schema id that neither the registry nor the embedded set knows."""

    reason = "unknown_schema_id"


class ValidationError(PermanentError):
    """A decoded record that breaks the contract (see ``reason`` for which rule)."""

    reason = "invalid"


class TopologyDriftError(PermanentError):
    """The broker's topics differ from what topologies/ declares."""

    reason = "topology_drift"


class BrokerUnavailableError(TransientError):
    """Kafka did not answer or did not acknowledge a write in time."""

    reason = "broker_unavailable"


class RecordTooLargeError(PermanentError):
    """A record over the producer's or the broker's size limit: sending it again cannot help."""

    reason = "record_too_large"


class SchemaRegistryUnavailableError(TransientError):
    """The configured schema registry did not answer."""

    reason = "schema_registry_unavailable"


class RenderError(PermanentError):
    """A template is missing, fails to render, or lacks required variables."""

    reason = "render_failed"


class TemplateArchiveLoadingError(TransientError):
    """A route asks for an archived template version while the archive still loads."""

    reason = "template_archive_loading"


class InvalidAddressError(PermanentError):
    """A recipient address a channel cannot use: not one plain mailbox (or one that could
    smuggle headers), or not a valid E.164 phone number."""

    reason = "invalid_address"


class InDoubtError(PermanentError):
    """A route's earlier delivery began but its outcome was never recorded, and its type
    holds such routes for an operator (``in_doubt: hold``) rather than risk a copy."""

    reason = "in_doubt"


class HttpDeferredError(TransientError):
    """An HTTP endpoint answered 429 or 5xx: try again, no sooner than ``retry_after_s``."""

    reason = "http_deferred"

    def __init__(self, detail: str = "", *, code: int, retry_after_s: float | None) -> None:
        super().__init__(detail, code=code)
        #: What the endpoint's Retry-After asked for, in seconds (None: it did not say).
        self.retry_after_s = retry_after_s


class HttpRejectedError(PermanentError):
    """An HTTP endpoint refused the request (a 4xx other than 408, 410 and 429, or a
    redirect, which Herald does not follow)."""

    reason = "http_rejected"


class EndpointGoneError(PermanentError):
    """An HTTP endpoint answered 410 Gone: it wants no more deliveries."""

    reason = "endpoint_gone"


class HttpTimeoutError(TransientError):
    """An HTTP endpoint did not answer within the timeout."""

    reason = "http_timeout"
    server_unavailable = True


class HttpConnectionError(TransientError):
    """An HTTP endpoint could not be reached (refused, reset, unknown host)."""

    reason = "http_unreachable"
    server_unavailable = True


class SmtpDeferredError(TransientError):
    """The SMTP server answered 4xx: try again later."""

    reason = "smtp_deferred"


class SmtpRejectedError(PermanentError):
    """The SMTP server answered 5xx: this message will not be accepted."""

    reason = "smtp_rejected"


class SmtpTimeoutError(TransientError):
    """The SMTP server did not answer within the timeout."""

    reason = "smtp_timeout"
    server_unavailable = True


class SmtpConnectionError(TransientError):
    """The SMTP server could not be reached or dropped the connection."""

    reason = "smtp_connection"
    server_unavailable = True


class IdempotencyConflictError(PermanentError):
    """An idempotency key reused with a different request body."""

    reason = "idempotency_conflict"


class InvalidRequestError(ValidationError):
    """A request that breaks one or more rules at once; ``problems`` has each."""

    reason = "invalid_request"

    def __init__(self, problems: list[ValidationError]) -> None:
        super().__init__(
            "; ".join(f"{p.reason}: {p.detail}" for p in problems), reason=problems[0].reason
        )
        #: Every rule broken, in the order checked.
        self.problems = problems


class RateLimitedError(TransientError):
    """A limit of topologies/limits.yaml is spent; ``retry_after_s`` says when it is not."""

    reason = "rate_limited"

    def __init__(self, detail: str, *, retry_after_s: float) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class PushPayloadError(PermanentError):
    """A push that cannot be encoded: its type has no FlatBuffers table, a payload field
    has the wrong type, or the payload exceeds the size cap (see ``reason``)."""

    reason = "push_payload_invalid"


class GatewayTimeoutError(TransientError):
    """Kafka did not acknowledge a gateway publication (or a look into the gateway
    topic) within the timeout: the broker is away or overloaded, which is not the
    push's fault, so the route waits without spending an attempt."""

    reason = "gateway_timeout"
    server_unavailable = True


class GatewayProducerResetError(GatewayTimeoutError):
    """The gateway's producer failed fatally (an idempotence sequence error after a
    broker restart) and a new one takes over: the push may or may not have landed."""

    reason = "gateway_producer_reset"


class GatewayUnavailableError(TransientError):
    """The gateway topic cannot take the push now: missing, unauthorised, or its
    partitions have no leader (``reason`` says which)."""

    reason = "gateway_unavailable"
