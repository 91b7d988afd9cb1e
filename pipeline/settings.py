"""Herald's one settings object.

Every field is read from exactly one environment variable (``HERALD_<FIELD>``, or
the ecosystem's standard name where one exists, such as ``KAFKA_BOOTSTRAP_SERVERS``)
and validated once, at start-up. Code receives a ``Settings`` instance; nothing
else reads the environment.
"""

from __future__ import annotations

import json
from email.utils import parseaddr
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _revealed(value: object) -> str:
    """A secret inside a dict or list setting, for a child process's environment."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


#: The repository root when running from a checkout; the defaults for data folders
#: (schemas, topologies, templates) point here so that a fresh clone just works.
REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Validated configuration of a Herald process (worker, CLI or API)."""

    model_config = SettingsConfigDict(
        env_prefix="HERALD_",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    # --- Kafka -----------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
        description="Kafka bootstrap servers, comma-separated host:port.",
    )
    schema_registry_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SCHEMA_REGISTRY_URL", "schema_registry_url"),
        description=(
            "Confluent-compatible schema registry. Unset: the embedded registry with "
            "ids pinned in schemas/registry.json."
        ),
    )
    topology_profile: Literal["local", "production"] = Field(
        default="local",
        description="Which profile of topologies/topics.yaml to apply (RF 1 or RF 3).",
    )
    topic_prefix: str = Field(
        default="",
        description="Prefix added to every topic name (isolates test runs and tenants).",
    )
    app_id: str = Field(
        default="herald",
        description="Faust application id; also the consumer group of the worker.",
    )

    # --- Data folders ------------------------------------------------------------
    topology_dir: Path = Field(
        default=REPO_ROOT / "topologies", description="Folder with topics.yaml and catalog.yaml."
    )
    schemas_dir: Path = Field(
        default=REPO_ROOT / "schemas", description="Folder with the .avsc files and registry.json."
    )
    templates_dir: Path = Field(
        default=REPO_ROOT / "templates", description="Folder with mail and push templates."
    )
    state_dir: Path = Field(
        default=REPO_ROOT / ".state",
        description="Local state (broker data, worker table stores).",
    )

    # --- Intake ------------------------------------------------------------------
    idempotency_window_s: int = Field(
        default=7 * 24 * 3600,
        gt=0,
        description="How long an (producer, idempotency_key) pair is remembered.",
    )
    idempotency_sweep_interval_s: float = Field(
        default=300.0,
        gt=0,
        description="How often expired idempotency keys are deleted from the table.",
    )
    payload_max_bytes: int = Field(
        default=64 * 1024, gt=0, description="Largest payload_json an intent may carry (bytes)."
    )
    dead_letter_max_bytes: int = Field(
        default=960_000,
        ge=64 * 1024,
        description=(
            "Largest encoded dead letter (bytes), below the producer's and the DLQ topics' "
            "1 MB limit: a larger one has its biggest variable parts cut to fit."
        ),
    )
    max_recipients: int = Field(
        default=1000, gt=0, description="Most recipient_user_ids one intent may name."
    )
    batch_max: int = Field(
        default=500,
        gt=0,
        description="Most events an agent handles before it waits for its outputs' acks.",
    )

    batch_linger_s: float = Field(
        default=0.05,
        gt=0,
        description="Longest a handled record waits for its batch to be written.",
    )

    fetch_interval_ms: int = Field(
        default=40,
        ge=0,
        le=1000,
        description=(
            "Least time between two fetches of a worker's consumer from one broker (0: "
            "fetch again at once). Each fetch costs ~2.5 ms of CPU whatever it brings; "
            "an idle worker still waits at the broker (docs/performance.md)."
        ),
    )

    gc_young_threshold: int = Field(
        default=20_000,
        ge=0,
        description=(
            "Allocations between two collections of Python's youngest generation (0: "
            "Python's default, 700, and nothing frozen). Larger means fewer, longer "
            "pauses of the cyclic collector (docs/performance.md, sixth pass)."
        ),
    )

    push_handoff: bool = Field(
        default=True,
        description=(
            "The route stage publishes a push it routes now itself instead of writing it "
            "to notification.push.requested for the push stage (docs/push.md)."
        ),
    )

    batches_in_flight: int = Field(
        default=2,
        ge=0,
        description=(
            "Batches a stage writes while it handles the next (0: it waits for each); "
            "their table writes and acks still land in order, after their outputs."
        ),
    )

    clock_offset_ms: int = Field(
        default=0,
        description="Shifts the worker's notion of now (tests, drills); 0 in production.",
    )

    # --- Worker --------------------------------------------------------------------
    commit_interval_s: float = Field(
        default=1.0, gt=0, description="How often a worker commits the offsets it has finished."
    )
    session_timeout_s: float = Field(
        default=10.0,
        ge=6,
        description="Consumer session timeout: how soon a dead worker's partitions move.",
    )
    kafka_ack_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A write Kafka has not acknowledged after this long is sent again.",
    )
    stall_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="A worker whose lagging partitions commit nothing this long exits (75).",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address a worker serves /metrics on (0.0.0.0 in a container).",
    )
    metrics_port: int = Field(
        default=9102,
        ge=0,
        lt=65536,
        description="Port a worker serves /metrics on (0: none).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Worker log level."
    )
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one object per line with the ids; text: for people."
    )
    log_addresses: bool = Field(
        default=False, description="Log email addresses in full (default: redacted)."
    )
    otel_traces_exporter: Literal["none", "otlp", "console"] = Field(
        default="none",
        validation_alias=AliasChoices("OTEL_TRACES_EXPORTER", "otel_traces_exporter"),
        description=(
            "OpenTelemetry traces: none (off), otlp (the exporter reads the standard "
            "OTEL_EXPORTER_OTLP_* variables), console."
        ),
    )
    otel_service_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OTEL_SERVICE_NAME", "otel_service_name"),
        description="service.name of the spans (default: herald-worker, herald-api).",
    )

    # --- Email channel -----------------------------------------------------------
    email_provider: Literal["smtp", "stub"] = Field(
        default="smtp",
        description="smtp delivers over SMTP; stub only logs, with scriptable outcomes.",
    )
    smtp_host: str = Field(default="127.0.0.1", description="SMTP server host.")
    smtp_port: int = Field(
        default=1025, gt=0, lt=65536, description="SMTP server port (1025: `herald smtp-sink`)."
    )
    smtp_security: Literal["none", "starttls", "tls"] = Field(
        default="none", description="none, starttls (upgrade after connect) or tls (implicit TLS)."
    )
    smtp_validate_certs: bool = Field(
        default=True, description="Verify the SMTP server's TLS certificate."
    )
    smtp_username: str | None = Field(default=None, description="SMTP AUTH user (unset: no AUTH).")
    smtp_password: SecretStr | None = Field(default=None, description="SMTP AUTH password.")
    smtp_timeout_s: float = Field(
        default=15.0, gt=0, description="Longest wait for any one SMTP reply (timeout: transient)."
    )
    http_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for an HTTP channel's endpoint to answer (timeout: transient).",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="Signing key of the webhook channel (Standard Webhooks `whsec_...`); "
        "while rotating, several separated by spaces (each signs). Required when a catalog "
        "type uses the webhook channel.",
    )
    webhook_endpoints: dict[str, str] = Field(
        default_factory=dict,
        description="Named webhook endpoints a catalog type's `webhook_endpoint` refers to, "
        'as JSON: {"orders": "https://hooks.example.com/herald"}.',
    )
    webhook_require_https: bool = Field(
        default=True,
        description="Refuse webhook URLs that are not https (such a route is skipped as "
        "invalid_webhook_url).",
    )
    webhook_connections: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Webhook routes one worker has in flight at once.",
    )
    slack_base_url: str = Field(
        default="https://hooks.slack.com",
        description="Where Slack incoming webhooks are posted: each webhook URL's path is "
        "sent to this base (tests point it at a local server).",
    )
    slack_webhooks: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Named Slack incoming webhooks a catalog type's `slack_webhook` refers "
        'to, as JSON: {"ops": "https://hooks.slack.com/services/T.../B.../..."}.',
    )
    slack_connections: int = Field(
        default=4, ge=1, le=64, description="Slack routes one worker has in flight at once."
    )
    sms_provider: Literal["twilio", "stub"] = Field(
        default="stub",
        description="twilio sends through Twilio's Messages API (or a service that speaks "
        "it, at HERALD_SMS_BASE_URL); stub only logs.",
    )
    sms_base_url: str = Field(
        default="https://api.twilio.com", description="Base URL of the Twilio-compatible API."
    )
    sms_account_sid: str | None = Field(default=None, description="Twilio account SID.")
    sms_auth_token: SecretStr | None = Field(default=None, description="Twilio auth token.")
    sms_from: str | None = Field(
        default=None,
        description="Sender: an E.164 number, or a messaging service SID (MG...).",
    )
    sms_connections: int = Field(
        default=4, ge=1, le=64, description="SMS routes one worker has in flight at once."
    )
    smtp_connections: int = Field(
        default=4,
        ge=1,
        le=64,
        description="SMTP connections per email lane (routes of a lane in flight at once).",
    )
    smtp_breaker_threshold: int = Field(
        default=5,
        ge=1,
        description="Consecutive connection failures or timeouts that open the SMTP circuit.",
    )
    smtp_breaker_cooldown_s: float = Field(
        default=15.0,
        gt=0,
        description="Wait before the first probe of an open SMTP circuit (doubles on failure).",
    )
    smtp_breaker_max_cooldown_s: float = Field(
        default=300.0, gt=0, description="Longest wait between probes of an open SMTP circuit."
    )
    smtp_from: str = Field(
        default="Herald <no-reply@herald.invalid>", description="From header and envelope sender."
    )
    smtp_reply_to: str | None = Field(default=None, description="Reply-To header (unset: none).")
    stub_outcomes: str = Field(
        default="",
        description=(
            "Stub provider script: `pattern=outcome[,outcome...]` rules separated by `;`, "
            "outcomes accept, defer, reject, timeout (e.g. `*@bounce.invalid=reject`)."
        ),
    )
    suppress_hard_bounces: bool = Field(
        default=True,
        description="Add an address to the suppression list when SMTP rejects it (550/551/553).",
    )

    # --- Push channel --------------------------------------------------------------
    gateway_topic: str | None = Field(
        default=None,
        description="Topic the client gateway reads (unset: the declared gateway.client-events).",
    )
    gateway_bootstrap_servers: str | None = Field(
        default=None,
        description="Kafka cluster of the gateway topic (unset: KAFKA_BOOTSTRAP_SERVERS).",
    )
    gateway_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for the gateway topic to acknowledge a push (then: transient).",
    )
    push_max_payload_bytes: int = Field(
        default=4096,
        ge=256,
        description="Largest push payload (FlatBuffers bytes); a larger one fails permanently.",
    )

    # --- HTTP API ------------------------------------------------------------------
    api_host: str = Field(default="127.0.0.1", description="Address `herald api` listens on.")
    api_port: int = Field(default=8080, gt=0, lt=65536, description="Port `herald api` listens on.")
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token the API requires (unset: no token; keep the API internal).",
    )
    producer_tokens: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Bearer tokens of the producers that send intents over HTTP (POST "
        '/api/v1/notifications), by producer id, as JSON: {"game-master": "..."}. A token '
        "sends only as its producer. Unset: HERALD_API_TOKEN sends as any producer.",
    )
    operator_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the operator endpoints (unset: HERALD_API_TOKEN guards them).",
    )
    status_db: Path | None = Field(
        default=None,
        description="SQLite file of the API's status view (unset: under HERALD_STATE_DIR); "
        "rebuilt from notification.status when missing.",
    )
    api_kafka_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Longest the API waits for Kafka to acknowledge a request before a 503.",
    )

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _non_empty_servers(cls, value: str) -> str:
        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("KAFKA_BOOTSTRAP_SERVERS must name at least one host:port")
        return ",".join(servers)

    @field_validator("smtp_from", "smtp_reply_to")
    @classmethod
    def _mailbox(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _, address = parseaddr(value)
        if "@" not in address or any(c in value for c in "\r\n"):
            raise ValueError(f"not a mailbox (Name <user@domain> or user@domain): {value!r}")
        return value

    @classmethod
    def env_var(cls, field_name: str) -> str:
        """The environment variable that sets ``field_name``."""
        alias = cls.model_fields[field_name].validation_alias
        if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
            return alias.choices[0]
        return f"HERALD_{field_name.upper()}"

    def as_env(self) -> dict[str, str]:
        """These settings as environment variables (to hand to a child process)."""
        return {
            self.env_var(name): value.get_secret_value()
            if isinstance(value, SecretStr)
            else json.dumps(value, default=_revealed)
            if isinstance(value, dict | list)
            else str(value)
            for name, value in self.model_dump().items()
            if value is not None
        }

    def topic(self, logical_name: str) -> str:
        """The physical name of a topic declared in topologies/ under ``logical_name``."""
        return f"{self.topic_prefix}{logical_name}"

    @property
    def gateway_topic_name(self) -> str:
        """The physical topic push payloads are published to."""
        return self.gateway_topic or self.topic("gateway.client-events")

    @property
    def message_id_domain(self) -> str:
        """Right-hand side of the Message-IDs Herald writes: the From address's domain."""
        return parseaddr(self.smtp_from)[1].rsplit("@", 1)[-1]

    @property
    def status_db_path(self) -> Path:
        """Where the API keeps its status view."""
        return self.status_db or self.state_dir / "api" / f"{self.app_id}-status.sqlite3"

    @property
    def worker_dir(self) -> Path:
        """Where this app's worker keeps local table state."""
        return self.state_dir / "worker" / self.app_id
