"""`herald`: the operator's command line.

Every command reads the same Settings (environment variables, see README), so
`herald` talks to whatever cluster the workers use.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError as SettingsError

from pipeline.contracts import Contracts, RecordCodec, evolution
from pipeline.contracts import push as push_payloads
from pipeline.contracts.records import DeadLetter, PushDevice, QuietHours, UserProfile
from pipeline.errors import HeraldError
from pipeline.ops import asyncapi as asyncapi_doc
from pipeline.runtime.records import Out
from pipeline.settings import REPO_ROOT, Settings
from pipeline.topology import Topology
from pipeline.topology import admin as topology_admin

if TYPE_CHECKING:  # the dlq module is imported by its commands only
    from pipeline.ops.dlq import Unreadable


def _settings() -> Settings:
    try:
        return Settings()
    except SettingsError as exc:
        raise click.ClickException(f"invalid configuration:\n{exc}") from exc


@click.group()
def cli() -> None:
    """Herald: a Kafka-native notification pipeline."""


def main() -> None:
    """Console entry point: HeraldError becomes a one-line message and exit code 1."""
    try:
        cli(standalone_mode=True)
    except HeraldError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


# --- topics ------------------------------------------------------------------------


@cli.group()
def topics() -> None:
    """Create and verify the topics declared in topologies/."""


def _print_report(report: topology_admin.Report) -> None:
    for name in report.created:
        click.echo(f"created  {name}")
    for drift in report.drift:
        click.echo(f"DRIFT    {drift}")


@topics.command("apply")
def topics_apply() -> None:
    """Create missing topics; report (never delete or alter) anything that differs."""
    settings = _settings()
    topology = Topology.load(settings)
    report = topology_admin.apply(settings, topology)
    _print_report(report)
    click.echo(
        f"{len(topology.topics)} topics declared ({settings.topology_profile} profile), "
        f"{len(report.created)} created, {len(report.drift)} drift"
    )


@topics.command("check")
def topics_check() -> None:
    """Exit non-zero when the broker differs from topologies/."""
    settings = _settings()
    topology = Topology.load(settings)
    report = topology_admin.check(settings, topology)
    _print_report(report)
    if report.drift:
        raise click.ClickException(f"{len(report.drift)} difference(s) from topologies/")
    click.echo(f"{len(topology.topics)} topics match topologies/ ({settings.topology_profile})")


@topics.command("list")
def topics_list() -> None:
    """Print the declared topics with partitions, group and purpose."""
    settings = _settings()
    topology = Topology.load(settings)
    for spec in topology.topics.values():
        click.echo(
            f"{settings.topic(spec.name):48} {spec.partitions:3}p rf{spec.replication_factor} "
            f"{spec.group:7} {spec.doc}"
        )


# --- schemas -----------------------------------------------------------------------


@cli.group()
def schemas() -> None:
    """The compatibility gate of the contracts in schemas/ (docs/contracts.md)."""


@schemas.command("check")
def schemas_check() -> None:
    """Exit non-zero when a current schema breaks its subject's compatibility with a
    published version, is not published, or a published version changed."""
    settings = _settings()
    problems = evolution.check(settings.schemas_dir)
    for problem in problems:
        click.echo(f"BREAKS   {problem}")
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) with the contracts")
    history = evolution.History.load(settings.schemas_dir)
    click.echo(
        f"{len(history.subjects())} Avro subjects ({len(history.avro)} versions) and "
        f"{len(history.flatbuffers)} FlatBuffers version(s): every current schema conforms"
    )


@schemas.command("pin")
def schemas_pin() -> None:
    """Publish each changed (compatible) schema as a new version in schemas/history/,
    with the next id in schemas/registry.json; commit the result."""
    for version in evolution.pin(_settings().schemas_dir):
        pinned = "" if version.schema_id is None else f" as id {version.schema_id}"
        click.echo(f"pinned   {version.subject} v{version.version}{pinned}: {version.file}")


@schemas.command("register")
def schemas_register() -> None:
    """Set each subject's compatibility in the registry at SCHEMA_REGISTRY_URL, then
    register its published versions in order."""
    settings = _settings()
    if not settings.schema_registry_url:
        raise click.ClickException("SCHEMA_REGISTRY_URL is not set")
    history = evolution.History.load(settings.schemas_dir)
    for done in evolution.register(settings.schemas_dir, settings.schema_registry_url):
        click.echo(
            f"{done.subject:24} v{done.version}  id {done.schema_id:<5} "
            f"compatibility {history.level(done.subject)}"
        )


@cli.command()
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write it there instead of printing it (docs/asyncapi.yaml is the checked-in copy).",
)
def asyncapi(output: Path | None) -> None:
    """The AsyncAPI 3 document of every topic, from topologies/ and schemas/: roles,
    keys, schemas, partitions (production profile; every profile's count in each
    description) and retention."""
    settings = _settings()
    path = settings.topology_dir / "topics.yaml"
    profiles = [Topology.from_file(path, p) for p in ("production", "local")]
    text = asyncapi_doc.render(asyncapi_doc.document(profiles, settings.schemas_dir))
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}")


# --- producing ---------------------------------------------------------------------


@cli.command()
@click.option("--type", "notification_type", required=True, help="Catalog notification type.")
@click.option("--producer", required=True, help="Producer id, e.g. game-master.")
@click.option("--key", "idempotency_key", default=None, help="Idempotency key (default: random).")
@click.option("--to", "recipients", default="", help="Comma-separated recipient user ids.")
@click.option("--audience", type=click.Choice(["user", "admin_email"]), default="user")
@click.option("--payload", default="{}", help="Payload as a JSON object.")
@click.option(
    "--priority", type=click.Choice(["critical", "high", "normal", "low"]), default="normal"
)
@click.option("--request-id", default=None)
@click.option("--trace-id", default=None)
@click.option("--tenant-id", default=None)
def produce(
    notification_type: str,
    producer: str,
    idempotency_key: str | None,
    recipients: str,
    audience: str,
    payload: str,
    priority: str,
    request_id: str | None,
    trace_id: str | None,
    tenant_id: str | None,
) -> None:
    """Publish one intent (Avro, Confluent wire format) and wait for Kafka's ack. It is
    checked against the catalog first, as intake will: one that intake would refuse is
    not sent, and the command exits 1 with the reason."""
    from pipeline.producer import HeraldProducer, build_intent
    from pipeline.stages.intake import validate
    from pipeline.topology import Catalog

    try:
        payload_obj = json.loads(payload)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from exc
    settings = _settings()
    intent = build_intent(
        notification_type=notification_type,
        producer=producer,
        idempotency_key=idempotency_key or str(uuid.uuid4()),
        recipient_user_ids=[r for r in recipients.split(",") if r],
        audience_kind=audience,
        payload=payload_obj,
        priority=priority,
        request_id=request_id,
        trace_id=trace_id,
        tenant_id=tenant_id,
    )
    validate(intent, Catalog.load(settings), settings)  # ValidationError: exit 1, the reason
    with HeraldProducer(settings) as herald:
        herald.publish(intent)
    click.echo(json.dumps(intent.to_avro()))


@cli.group()
def users() -> None:
    """Publish user profiles (normally the user service's job)."""


@users.command("put")
@click.option("--user-id", required=True)
@click.option("--email", default=None)
@click.option("--language", "preferred_language", default=None)
@click.option("--timezone", default=None)
@click.option("--tenant-id", default=None)
@click.option("--device", "devices", multiple=True, help="Push token, as TOKEN or PLATFORM:TOKEN.")
@click.option("--disable", "channels_disabled", multiple=True, help="Channel to turn off.")
@click.option("--opt-out", "opt_outs", multiple=True, help="Type, category or channel:category.")
@click.option("--quiet", default=None, help="Quiet hours as HH:MM-HH:MM (user's timezone).")
def users_put(
    user_id: str,
    email: str | None,
    preferred_language: str | None,
    timezone: str | None,
    tenant_id: str | None,
    devices: tuple[str, ...],
    channels_disabled: tuple[str, ...],
    opt_outs: tuple[str, ...],
    quiet: str | None,
) -> None:
    """Publish (create or replace) a user profile."""
    from pipeline.producer import HeraldProducer

    push = [
        PushDevice(platform=d.split(":", 1)[0], token=d.split(":", 1)[1])
        if ":" in d
        else PushDevice(token=d)
        for d in devices
    ]
    quiet_hours = None
    if quiet:
        start, _, end = quiet.partition("-")
        quiet_hours = QuietHours(start=start, end=end)
    profile = UserProfile(
        user_id=user_id,
        email=email,
        preferred_language=preferred_language,
        timezone=timezone,
        tenant_id=tenant_id,
        push_devices=push,
        channels_disabled=list(channels_disabled),
        opt_outs=list(opt_outs),
        quiet_hours=quiet_hours,
        updated_at_ms=int(time.time() * 1000),
    )
    with HeraldProducer(_settings()) as herald:
        herald.put_user(profile)  # a profile Herald would refuse: exit 1 with the reason
    click.echo(json.dumps(profile.to_avro()))


@users.command("delete")
@click.option("--user-id", required=True)
def users_delete(user_id: str) -> None:
    """Publish a tombstone for a user."""
    from pipeline.producer import HeraldProducer

    with HeraldProducer(_settings()) as herald:
        herald.delete_user(user_id)
    click.echo(f"tombstone published for {user_id}")


# --- reading -----------------------------------------------------------------------

_TAILS = {
    "status": ("notification.status", "status"),
    "malformed": ("notification.intents.malformed", "malformed"),
    "recipients": ("notification.recipients", "recipient"),
    "intents": ("notification.intents", "intent"),
    "users": ("notification.users", "user"),
    "push-routes": ("notification.push.routes", "channel_request"),
    "push-feedback": ("gateway.device-feedback", "device_feedback"),
    "gateway": ("gateway.client-events", "push"),
}


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: base64.b64encode(v).decode("ascii") if isinstance(v, bytes) else v
        for k, v in record.items()
    }


def _text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""


def render_record(codec: RecordCodec[Any] | None, value: bytes | None) -> dict[str, Any]:
    """A record as JSON-friendly data (``codec`` None: a FlatBuffers push); undecodable
    bytes are shown, not raised."""
    if value is None:
        return {"tombstone": True}
    try:
        if codec is None:
            return dataclasses.asdict(push_payloads.decode(value))
        return _jsonable(codec.decode(value).to_avro())
    except HeraldError as exc:
        return {"undecodable": str(exc), "raw_b64": base64.b64encode(value).decode("ascii")}


def _tail_of(settings: Settings, what: str) -> tuple[str, str]:
    """The logical topic and codec of a ``herald tail`` WHAT: a name of _TAILS, or
    <channel>-requests, <channel>-<lane> (priority, high, low) or <channel>-dlq for a
    declared channel."""
    if what in _TAILS:
        return _TAILS[what]
    channels = Topology.load(settings).channels
    name, _, kind = what.rpartition("-")
    channel = channels.get(name)
    if channel is not None:
        if kind == "dlq":
            return channel.dlq, "dead_letter"
        lane = "bulk" if kind == "requests" else kind
        if lane in channel.lanes:
            return channel.lanes[lane], "channel_request"
    lanes = [
        f"{c.name}-{'requests' if lane == 'bulk' else lane}"
        for c in channels.values()
        for lane in c.lanes
    ]
    known = sorted([*_TAILS, *lanes, *(f"{c}-dlq" for c in channels)])
    raise click.BadParameter(f"{what!r} is none of {', '.join(known)}", param_hint="WHAT")


@cli.command()
@click.argument("what")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records.")
@click.option(
    "--idle-timeout",
    type=float,
    default=None,
    help="With --follow: stop after this many seconds without a record.",
)
def tail(what: str, follow: bool, idle_timeout: float | None) -> None:
    """Print a topic's records as JSON lines (decoded), from the beginning.

    WHAT: status, malformed, recipients, intents, users, push-routes, push-feedback,
    gateway, or <channel>-requests, <channel>-priority, <channel>-dlq
    (email-requests, webhook-dlq, ...)."""
    from pipeline.ops.reader import read_messages

    settings = _settings()
    logical, codec_name = _tail_of(settings, what)
    codec: RecordCodec[Any] | None = None
    if codec_name != "push":
        codec = getattr(Contracts(settings), codec_name)
    topic = settings.gateway_topic_name if what == "gateway" else settings.topic(logical)
    for msg in read_messages(settings, topic, follow=follow, idle_timeout_s=idle_timeout):
        key = msg.key()
        line = {
            "partition": msg.partition(),
            "offset": msg.offset(),
            "timestamp_ms": msg.timestamp()[1],
            "key": key.decode("utf-8", "replace") if key else None,
            "headers": {str(name): _text(value) for name, value in list(msg.headers() or [])},
            "value": render_record(codec, msg.value()),
        }
        click.echo(json.dumps(line, ensure_ascii=False))


# --- dead letters and malformed input ---------------------------------------------


def _letter_filter(
    channel: str | None,
    notification_type: str | None,
    error_class: str | None,
    reason: str | None,
    since: str | None,
    until: str | None,
    ids: tuple[str, ...] = (),
) -> Any:
    from pipeline.ops.dlq import LetterFilter
    from pipeline.times import parse_time

    now = int(time.time() * 1000)
    return LetterFilter(
        channel=channel,
        notification_type=notification_type,
        error_class=error_class,
        reason=reason,
        since_ms=parse_time(since, now) if since else None,
        until_ms=parse_time(until, now) if until else None,
        ids=frozenset(ids),
    )


def _filter_options(command: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option("--channel", help="Only this channel (email, push, webhook, ...)."),
        click.option("--type", "notification_type", help="Only this notification type."),
        click.option(
            "--error-class",
            type=click.Choice(["transient", "permanent"]),
            help="Only letters whose last attempt failed this way.",
        ),
        click.option("--reason", help="Only this last reason (smtp_deferred, ...)."),
        click.option("--since", help="Dead-lettered at or after: ISO time or an age (2h, 7d)."),
        click.option("--until", help="Dead-lettered before: ISO time or an age."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.group()
def dlq() -> None:
    """Dead letters: list them, show one with its history, replay them at a rate."""


@dlq.command("list")
@_filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per letter.")
def dlq_list(
    channel: str | None,
    notification_type: str | None,
    error_class: str | None,
    reason: str | None,
    since: str | None,
    until: str | None,
    as_json: bool,
) -> None:
    """The dead letters that match, oldest first ([replayed] once replayed)."""
    from pipeline.ops.dlq import letter_summary, read_letters, replayed

    settings = _settings()
    contracts = Contracts(settings)
    selected = _letter_filter(channel, notification_type, error_class, reason, since, until)
    letters = read_letters(settings, contracts, selected, _warn_unreadable)
    log = replayed(settings)
    for letter in letters:
        if as_json:
            data = _jsonable({k: v for k, v in letter.to_avro().items() if k != "request"})
            data["replayed"] = log.get(letter.dead_letter_id)
            click.echo(json.dumps(data, ensure_ascii=False))
        else:
            click.echo(letter_summary(letter, log.get(letter.dead_letter_id)))
    click.echo(f"{len(letters)} dead letter(s)", err=True)


@dlq.command("show")
@click.argument("letter_id")
def dlq_show(letter_id: str) -> None:
    """One dead letter (by dead_letter_id or route_id) with every attempt and its route."""
    from pipeline.ops.dlq import LetterFilter, letter_detail, read_letters, replayed

    settings = _settings()
    contracts = Contracts(settings)
    letters = read_letters(
        settings, contracts, LetterFilter(ids=frozenset({letter_id})), _warn_unreadable
    )
    if not letters:
        raise click.ClickException(f"no dead letter {letter_id}")
    log = replayed(settings)
    for letter in letters:
        data = _jsonable(letter_detail(contracts, letter))
        data["request"] = _jsonable(data["request"])
        data["replayed"] = log.get(letter.dead_letter_id)
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))


@dlq.command("replay")
@_filter_options
@click.option("--id", "ids", multiple=True, help="Only this dead_letter_id or route_id.")
@click.option("--rate", default="50/s", show_default=True, help="Most routes sent per second.")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; write nothing.")
def dlq_replay(
    channel: str | None,
    notification_type: str | None,
    error_class: str | None,
    reason: str | None,
    since: str | None,
    until: str | None,
    ids: tuple[str, ...],
    rate: str,
    dry_run: bool,
) -> None:
    """Send matching dead letters back to their lanes with a fresh budget, once each."""
    from pipeline.ops.dlq import letter_summary, parse_rate, read_letters, replay

    settings = _settings()
    contracts = Contracts(settings)
    per_second = parse_rate(rate)
    selected = _letter_filter(channel, notification_type, error_class, reason, since, until, ids)
    letters = read_letters(settings, contracts, selected, _warn_unreadable)
    if dry_run:
        report = replay(settings, contracts, letters, per_second=per_second, dry_run=True)
        for letter in report.replayed:
            click.echo(f"would replay  {letter_summary(letter, None)}")
        click.echo(
            f"dry run: {len(report.replayed)} would be replayed, {len(report.already)} already were"
            + _truncated_note(report.truncated)
        )
        return
    started = time.monotonic()
    with click.progressbar(length=len(letters), label="replaying", file=sys.stderr) as bar:
        report = replay(
            settings, contracts, letters, per_second=per_second, on_progress=lambda _: bar.update(1)
        )
    click.echo(
        f"replayed {len(report.replayed)} dead letter(s) in {time.monotonic() - started:.1f}s; "
        f"{len(report.already)} skipped (replayed before)" + _truncated_note(report.truncated)
    )


def _warn_unreadable(record: Unreadable) -> None:
    click.echo(f"skipped a record that is not a readable dead letter: {record}", err=True)


def _truncated_note(letters: list[DeadLetter]) -> str:
    if not letters:
        return ""
    ids = ", ".join(letter.dead_letter_id for letter in letters[:5])
    return (
        f"; {len(letters)} not replayed: cut to fit the DLQ (their producer must send them "
        f"again): {ids}"
    )


@cli.group("malformed")
def malformed_group() -> None:
    """Input Herald could not use, kept with its bytes, reason and origin."""


@malformed_group.command("list")
@click.option(
    "--kind",
    type=click.Choice(["intents", "other", "all"]),
    default="all",
    show_default=True,
    help="Malformed intents, other input (profiles, feedback, routes), or both.",
)
@click.option("--reason", help="Only this reason.")
@click.option("--since", help="Recorded at or after: ISO time or an age (2h, 7d).")
def malformed_list(kind: str, reason: str | None, since: str | None) -> None:
    """One line per malformed record: when, origin, reason, detail."""
    from pipeline.ops.dlq import MALFORMED_TOPICS, origin_of, read_malformed
    from pipeline.times import parse_time

    settings = _settings()
    kinds = list(MALFORMED_TOPICS) if kind == "all" else [kind]
    since_ms = parse_time(since, int(time.time() * 1000)) if since else None
    records = read_malformed(settings, Contracts(settings), kinds, since_ms)
    shown = [r for r in records if reason is None or r.reason == reason]
    for record in shown:
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.recorded_at_ms / 1000))
        click.echo(f"{at}  {origin_of(record)}  {record.reason}: {record.detail[:120]}")
    click.echo(f"{len(shown)} malformed record(s)", err=True)


@malformed_group.command("show")
@click.argument("origin")
def malformed_show(origin: str) -> None:
    """One malformed record by its origin, ``topic[partition]@offset`` as listed."""
    from pipeline.ops.dlq import MALFORMED_TOPICS, origin_of, read_malformed

    settings = _settings()
    records = read_malformed(settings, Contracts(settings), list(MALFORMED_TOPICS), None)
    found = [r for r in records if origin_of(r) == origin]
    if not found:
        raise click.ClickException(f"no malformed record from {origin}")
    for record in found:
        data = _jsonable(record.to_avro())
        for raw in ("raw_key", "raw_value"):
            value = getattr(record, raw)
            if value is not None:
                data[f"{raw}_text"] = value.decode("utf-8", "replace")
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))


# --- benchmark -----------------------------------------------------------------------


@cli.command()
@click.option(
    "--intents",
    type=int,
    default=20000,
    show_default=True,
    help="Records per baseline and intents for each push saturation run (drain, pipelined).",
)
@click.option(
    "--rate",
    type=float,
    default=1000.0,
    show_default=True,
    help="Offered load of the latency runs (intents per second).",
)
@click.option(
    "--duration",
    type=float,
    default=10.0,
    show_default=True,
    help="Length of the latency runs in seconds.",
)
@click.option(
    "--email-intents",
    type=int,
    default=2000,
    show_default=True,
    help="Intents for each email saturation run (0: no email runs).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes (one consumer group) serving the push runs; email runs use one.",
)
@click.option("--no-baselines", is_flag=True, help="Skip the passthrough baselines.")
@click.option(
    "--http-rate",
    type=float,
    default=500.0,
    show_default=True,
    help="Requests per second offered to POST /api/v1/notifications (0: no HTTP runs).",
)
@click.option(
    "--http-duration",
    type=float,
    default=10.0,
    show_default=True,
    help="Length of each HTTP run in seconds.",
)
@click.option("--http-only", is_flag=True, help="Run only the HTTP runs.")
def bench(
    intents: int,
    rate: float,
    duration: float,
    email_intents: int,
    workers: int,
    no_baselines: bool,
    http_rate: float,
    http_duration: float,
    http_only: bool,
) -> None:
    """Measure throughput, latency and memory on this broker; print the figures
    (docs/performance.md)."""
    from pipeline.ops.bench import run_bench

    run_bench(
        _settings(),
        intents=intents,
        rate=rate,
        duration_s=duration,
        email_intents=email_intents,
        baselines=not no_baselines,
        echo=click.echo,
        workers=workers,
        http_rate=http_rate,
        http_duration_s=http_duration,
        http_only=http_only,
    )


# --- push ----------------------------------------------------------------------------


@cli.group()
def push() -> None:
    """The push channel (gateway.client-events, device feedback)."""


@push.command("report-token")
@click.option("--user-id", required=True)
@click.option("--token", required=True)
@click.option("--reason", default="invalid_token", show_default=True)
def push_report_token(user_id: str, token: str, reason: str) -> None:
    """Report a dead push token the way the gateway does: later pushes skip it."""
    from pipeline.producer import HeraldProducer

    with HeraldProducer(_settings()) as herald:
        herald.report_invalid_token(user_id, token, reason)
    click.echo(f"reported token ...{token[-6:]} of {user_id} as {reason}")


# --- running -----------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument(
    "action", type=click.Choice(["start", "stop", "status", "restart", "logs", "wipe", "fetch"])
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def broker(action: str, args: tuple[str, ...]) -> None:
    """Manage the local Kafka broker of this checkout (scripts/kafka-local)."""
    import subprocess

    script = REPO_ROOT / "scripts" / "kafka-local"
    if not script.exists():
        raise click.ClickException(f"{script} not found: the local broker needs a checkout")
    sys.exit(subprocess.call([str(script), action, *args]))


@cli.command()
def worker() -> None:
    """Run a Herald worker (joins the consumer group; scale by running more)."""
    from pipeline.worker import Worker

    Worker(_settings()).run()


@cli.command()
def api() -> None:
    """Run the HTTP API (login-code intake, health) on HERALD_API_HOST:HERALD_API_PORT."""
    from pipeline.web.server import run

    run(_settings())


@cli.command("smtp-sink")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=1025, show_default=True)
@click.option(
    "--save-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep every mail as an .eml file here.",
)
def smtp_sink(host: str, port: int, save_dir: Path | None) -> None:
    """A local SMTP server that accepts and prints every mail (for local runs only)."""
    from pipeline.ops.smtp_sink import run_sink

    run_sink(host, port, save_dir, click.echo)


# --- suppression list ------------------------------------------------------------


@cli.group()
def suppress() -> None:
    """Addresses Herald must not mail (notification.email.suppressions)."""


def _write_suppression(add: bool, address: str, reason: str) -> None:
    from pipeline.views import SuppressionList

    suppressions = SuppressionList(_settings())
    _write_one(
        suppressions.entry(address, reason, "operator") if add else suppressions.lift(address)
    )


@suppress.command("add")
@click.argument("address")
@click.option("--reason", default="operator", show_default=True)
def suppress_add(address: str, reason: str) -> None:
    """Stop mailing ADDRESS."""
    _write_suppression(True, address, reason)
    click.echo(f"suppressed {address.strip().lower()} ({reason})")


@suppress.command("remove")
@click.argument("address")
def suppress_remove(address: str) -> None:
    """Mail ADDRESS again."""
    _write_suppression(False, address, "")
    click.echo(f"lifted {address.strip().lower()}")


@suppress.command("list")
def suppress_list() -> None:
    """Every suppressed address with its reason."""
    for entry in _compacted(_settings().topic("notification.email.suppressions")).values():
        click.echo(f"{entry.get('address')}\t{entry.get('reason')}\t{entry.get('source')}")


# --- webhook endpoints ------------------------------------------------------------


@cli.group()
def webhook() -> None:
    """Webhook endpoints Herald stopped calling (notification.webhook.disabled)."""


@webhook.command("disable")
@click.argument("url")
@click.option("--reason", default="operator", show_default=True)
def webhook_disable(url: str, reason: str) -> None:
    """Stop calling URL: its routes end suppressed (endpoint_disabled)."""
    from pipeline.views import DisabledEndpoints

    out = DisabledEndpoints(_settings()).entry(url, reason, "operator", int(time.time() * 1000))
    _write_one(out)
    click.echo(f"disabled {url} ({reason})")


@webhook.command("enable")
@click.argument("url")
def webhook_enable(url: str) -> None:
    """Call URL again (after it answered 410, or was disabled by an operator)."""
    from pipeline.views import DisabledEndpoints

    _write_one(DisabledEndpoints(_settings()).lift(url))
    click.echo(f"enabled {url}")


@webhook.command("disabled")
def webhook_disabled() -> None:
    """Every disabled endpoint with its reason and when."""
    for key, entry in _compacted(_settings().topic("notification.webhook.disabled")).items():
        click.echo(f"{key}\t{entry.get('reason')}\t{entry.get('at_ms')}\t{entry.get('detail')}")


def _write_one(out: Out) -> None:
    """Write one record and wait for Kafka's acknowledgement."""
    from confluent_kafka import Producer

    settings = _settings()
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "acks": "all"})
    producer.produce(out.topic, key=out.key, value=out.value)
    if producer.flush(15):
        raise click.ClickException("Kafka did not acknowledge the write")


def _compacted(topic: str) -> dict[str, dict[str, Any]]:
    """The latest JSON value per key of a compacted topic (tombstones delete)."""
    from pipeline.ops.reader import read_topic

    current: dict[bytes, bytes | None] = {}
    for *_, key, value in read_topic(_settings(), topic):
        if key is not None:
            current[key] = value
    return {
        key.decode("utf-8", "replace"): json.loads(value)
        for key, value in current.items()
        if value is not None
    }


@cli.command()
@click.option("--timeout", type=float, default=60.0, help="Seconds to wait for the worker.")
def demo(timeout: float) -> None:
    """Publish a sample intent (plus a duplicate, a conflict and garbage) and show what
    the running worker made of each."""
    from pipeline.ops.demo import run_demo

    if not run_demo(_settings(), timeout, click.echo):
        raise click.ClickException("the worker did not answer in time (is `herald worker` up?)")
