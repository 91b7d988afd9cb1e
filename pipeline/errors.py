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

    def __init__(self, detail: str = "", *, reason: str | None = None) -> None:
        super().__init__(detail or self.__class__.__doc__ or self.reason)
        self.detail = detail
        if reason is not None:
            self.reason = reason


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


class SchemaRegistryUnavailableError(TransientError):
    """The configured schema registry did not answer."""

    reason = "schema_registry_unavailable"
