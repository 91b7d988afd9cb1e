"""The push channel without a broker: the FlatBuffers schema and its bindings, the
type-to-table mapping, push templates, payload rules, TTL and device feedback."""

from __future__ import annotations

import asyncio
import filecmp
import inspect
import json
import re
import subprocess
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import pytest

from pipeline.contracts import Contracts
from pipeline.contracts import push as push_payloads
from pipeline.contracts.fbs import notification_generated as fbs
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import ChannelRequest, DeviceFeedback, PushDevice, QuietHours
from pipeline.errors import (
    GatewayTimeoutError,
    GatewayUnavailableError,
    HeraldError,
    PushPayloadError,
    RenderError,
)
from pipeline.providers.gateway import GatewayPublisher, PublishReceipt
from pipeline.rendering import TemplateCatalog
from pipeline.runtime.records import Out, RawRecord, Write
from pipeline.runtime.tables import WriteBehind
from pipeline.settings import REPO_ROOT, Settings
from pipeline.stages.channels import routings
from pipeline.stages.delay import TARGET
from pipeline.stages.handoff import DIGESTS, LIMITS, PUSH_REGISTRY, RouteAndPush
from pipeline.stages.push import (
    DOUBT_MARGIN_MS,
    DeviceFeedbackLog,
    PushChannel,
    invalid_tokens,
    usable_tokens,
)
from pipeline.stages.route import Router
from pipeline.times import Clock
from pipeline.topology import Catalog, Topology
from pipeline.topology.partitioning import partition_for
from tests.unit.helpers import raw, stage_context
from tests.unit.test_route import NOON_UTC, outcomes, profile, recipient, route

NOW = 1_800_000_000_000

#: A valid payload for every push type (the catalog's required fields).
SAMPLES: dict[str, dict[str, Any]] = {
    "game.turn.ready": {"game_id": "g-1", "game_name": "Andromeda", "turn_number": 42},
    "game.finished": {"game_id": "g-1", "game_name": "Andromeda", "final_turn_number": 99},
    "lobby.application.submitted": {"game_id": "g-2", "game_name": "Vega", "applicant_name": "Ann"},
    "lobby.membership.approved": {"game_id": "g-3", "game_name": "Lyra"},
    "lobby.membership.rejected": {"game_id": "g-4", "game_name": "Orion"},
    "lobby.invite.created": {"game_id": "g-5", "game_name": "Draco", "inviter_name": "Bo"},
    "lobby.invite.redeemed": {"game_id": "g-6", "game_name": "Cygnus", "invitee_name": "Cy"},
    "lobby.invite.expired": {"game_id": "g-7", "game_name": "Aquila"},
}


@pytest.fixture
def catalog(settings: Settings) -> Catalog:
    return Catalog.load(settings)


@pytest.fixture
def contracts(settings: Settings) -> Contracts:
    return Contracts(settings)


def push_types(catalog: Catalog) -> list[str]:
    return sorted(n for n, s in catalog.types.items() if "push" in s.channels.get("user", ()))


async def discard(records: Sequence[Out]) -> None:
    return None


def channel(
    settings: Settings,
    contracts: Contracts,
    clock: Clock | None = None,
    gateway: Any = None,
    write: Write = discard,
) -> PushChannel:
    return PushChannel(
        stage_context(settings, clock or Clock()), gateway or GatewayPublisher(settings), write
    )


def push_route(notification_type: str = "game.turn.ready", **fields: Any) -> ChannelRequest:
    values: dict[str, Any] = {
        "route_id": deterministic_id("n-1", "push", "u1"),
        "notification_id": "n-1",
        "notification_type": notification_type,
        "channel": "push",
        "template_id": notification_type,
        "user_id": "u1",
        "device_tokens": ["tok-a", "tok-b"],
        "locale": "de",
        "variables_json": json.dumps(SAMPLES.get(notification_type, {"game_id": "g"})),
        "occurred_at_ms": NOW - 1000,
        "deadline_ms": NOW + 3_600_000,
        "trace_id": "trace-1",
    }
    values.update(fields)
    return ChannelRequest(**values)


# --- the schema and its bindings ---------------------------------------------------


def test_generated_bindings_are_current(tmp_path: Path) -> None:
    """pipeline/contracts/fbs is what `make fbs` makes of schemas/notification.fbs."""
    subprocess.run([str(REPO_ROOT / "scripts" / "gen-fbs"), str(tmp_path)], check=True)
    committed = REPO_ROOT / "pipeline" / "contracts" / "fbs"
    generated = sorted(p.name for p in tmp_path.iterdir())
    assert generated == ["notification_generated.py"]
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, committed, generated, shallow=False)
    assert not mismatch, "run `make fbs` and commit the result"
    assert not errors


def test_catalog_and_schema_agree_on_the_type_to_table_mapping(catalog: Catalog) -> None:
    schema = (REPO_ROOT / "schemas" / "notification.fbs").read_text()
    documented = dict(re.findall(r"/// notification_type: (\S+)\ntable (\w+)", schema))
    mapped = {name: catalog.types[name].push_payload for name in push_types(catalog)}
    assert mapped == documented
    assert sorted(documented.values()) == sorted(push_payloads.BODY_TABLES)
    # The header's table says the same again, for readers of the schema file alone.
    for notification_type, table in documented.items():
        assert re.search(rf"//\s+{re.escape(notification_type)}\s+{table}\n", schema)


def test_each_body_table_holds_its_types_required_fields(catalog: Catalog) -> None:
    for name in push_types(catalog):
        spec = catalog.types[name]
        assert spec.push_payload is not None
        fields = push_payloads.BODY_TABLES[spec.push_payload][1]
        assert sorted(fields) == sorted(spec.required), name


@pytest.mark.parametrize("notification_type", sorted(SAMPLES))
def test_every_type_round_trips_and_reads_with_the_plain_generated_reader(
    settings: Settings, contracts: Contracts, notification_type: str
) -> None:
    request = push_route(notification_type)
    data = channel(settings, contracts).payload(request)

    # The plain (non-object) API, as a gateway's own reader would use it.
    assert fbs.Notification.NotificationBufferHasIdentifier(data, 0)
    envelope = fbs.Notification.GetRootAs(data, 0)
    assert envelope.Type().decode() == notification_type
    assert envelope.NotificationId().decode() == "n-1"
    assert envelope.RouteId().decode() == request.route_id
    assert envelope.UserId().decode() == "u1"
    assert envelope.OccurredAtMs() == NOW - 1000
    assert envelope.ExpiresAtMs() == NOW + 3_600_000
    assert envelope.Locale().decode() == "de"
    assert envelope.TraceId().decode() == "trace-1"
    assert [envelope.DeviceTokens(i).decode() for i in range(envelope.DeviceTokensLength())] == [
        "tok-a",
        "tok-b",
    ]
    table = Catalog.load(settings).types[notification_type].push_payload
    assert envelope.BodyType() == getattr(fbs.Body, str(table))
    body = getattr(fbs, str(table))()
    union = envelope.Body()
    body.Init(union.Bytes, union.Pos)
    for field, expected in SAMPLES[notification_type].items():
        accessor = "".join(part.title() for part in field.split("_"))
        value = getattr(body, accessor)()
        assert (value.decode() if isinstance(value, bytes) else value) == expected, field
    display = envelope.Display()
    assert display.Title()
    assert display.Body()
    assert display.Link().decode().startswith("https://play.example.com/games/")

    decoded = push_payloads.decode(data)
    assert decoded.body == SAMPLES[notification_type]
    assert decoded.body_table == table
    assert len(data) < 600


def test_body_values_are_converted_or_refused() -> None:
    body = push_payloads.body_from_variables(
        "GameTurnReady", {"game_id": 7, "game_name": "A", "turn_number": "42", "extra": "x"}
    )
    assert body == {"game_id": "7", "game_name": "A", "turn_number": 42}
    for bad in ("many", 4.5, True, [1]):
        with pytest.raises(PushPayloadError) as caught:
            push_payloads.body_from_variables("GameTurnReady", {"turn_number": bad})
        assert caught.value.reason == "payload_invalid"
    with pytest.raises(PushPayloadError, match="uint32"):
        push_payloads.encode(
            push_payloads.PushPayload(
                notification_type="game.turn.ready",
                notification_id="n",
                route_id="r",
                user_id="u",
                body_table="GameTurnReady",
                body={"turn_number": -1},
                display=push_payloads.Display("t", "b"),
            )
        )


def test_decode_refuses_what_is_not_a_herald_push() -> None:
    for data in (None, b"", b"garbage-bytes", b"\x00" * 32):
        with pytest.raises(Exception, match=r"Herald push|corrupt"):
            push_payloads.decode(data)


# --- templates ---------------------------------------------------------------------


def test_push_templates_render_per_locale_with_fallbacks(settings: Settings) -> None:
    templates = TemplateCatalog(settings.templates_dir)
    de = templates.render_push("game.finished", "de", SAMPLES["game.finished"])
    assert de.locale == "de"
    assert de.title == "Andromeda ist beendet"
    assert de.image_url == "https://play.example.com/games/g-1/final-map.png"  # from en
    assert de.link == "https://play.example.com/games/g-1"
    fallback = templates.render_push(
        "lobby.invite.created", "pt-BR", SAMPLES["lobby.invite.created"]
    )
    assert (fallback.locale, fallback.locale_fallback) == ("en", True)
    assert fallback.body == "Bo invited you to play."
    with pytest.raises(RenderError, match="missing required"):
        templates.render_push("game.turn.ready", "en", {"game_id": "g"}, ("turn_number",))


@pytest.mark.parametrize(
    ("part", "url", "ok"),
    [
        ("push_link", "https://play.example.com/x", True),
        ("push_link", "andromeda://games/7", True),
        ("push_link", "javascript:alert(1)", False),
        ("push_link", "data:text/html,hi", False),
        ("push_link", "/relative/path", False),
        ("push_link", "https://a.example/x y", False),
        ("push_image", "https://cdn.example/i.png", True),
        ("push_image", "http://cdn.example/i.png", False),
    ],
)
def test_push_urls_must_be_safe(tmp_path: Path, part: str, url: str, ok: bool) -> None:
    folder = tmp_path / "t.type" / "en"
    folder.mkdir(parents=True)
    (folder / "push_title.j2").write_text("T")
    (folder / "push_body.j2").write_text("B")
    (folder / f"{part}.j2").write_text("{{ url }}")
    templates = TemplateCatalog(tmp_path)
    if ok:
        rendered = templates.render_push("t.type", "en", {"url": url})
        assert url in (rendered.link, rendered.image_url)
    else:
        with pytest.raises(RenderError) as caught:
            templates.render_push("t.type", "en", {"url": url})
        assert caught.value.reason == "invalid_url"


# --- the agent's decisions without publication ---------------------------------------


def statuses(outputs: list[Out], contracts: Contracts) -> list[tuple[str, int, str | None]]:
    return [
        (e.status, e.attempt, e.reason)
        for e in (
            contracts.status.decode(o.value) for o in outputs if o.topic == "notification.status"
        )
    ]


def on_the_lane(contracts: Contracts, request: ChannelRequest) -> RawRecord:
    """``request`` as the push stage reads it from its lane."""
    return raw(
        contracts.channel_request.encode(request),
        topic="notification.push.requested",
        key=b"u1",
    )


def handle_now(push: PushChannel, request: ChannelRequest, contracts: Contracts) -> list[Out]:
    record = raw(
        contracts.channel_request.encode(request), topic="notification.push.requested", key=b"u1"
    )
    outputs = push.handle(record, WriteBehind({}))
    assert isinstance(outputs, list), "expected a decision without publication"
    return outputs


def test_a_push_past_its_deadline_expires_unpublished(
    settings: Settings, contracts: Contracts
) -> None:
    clock = Clock(offset_ms=NOW + 3_600_000 - Clock().now_ms())  # exactly at the deadline
    outputs = handle_now(channel(settings, contracts, clock), push_route(), contracts)
    assert statuses(outputs, contracts) == [("expired", 0, None)]
    assert not [o for o in outputs if o.topic == settings.gateway_topic_name]
    registry = [o for o in outputs if o.topic == "herald.push.deliveries.changelog"]
    assert json.loads(registry[0].value or b"")["state"] == "expired"


def test_an_unmapped_type_dead_letters_at_once(settings: Settings, contracts: Contracts) -> None:
    clock = Clock(offset_ms=NOW - Clock().now_ms())
    push = channel(settings, contracts, clock)
    outputs = handle_now(push, push_route("lobby.invite.revoked"), contracts)
    assert statuses(outputs, contracts) == [
        ("failed", 1, "push_type_unmapped"),
        ("dead_lettered", 1, "permanent_failure"),
    ]
    letter = contracts.dead_letter.decode(
        next(o.value for o in outputs if o.topic == "notification.push.dlq")
    )
    assert letter.channel == "push"
    assert letter.last_reason == "push_type_unmapped"
    assert "push_payload in topologies/catalog.yaml" in letter.last_error


def test_a_payload_over_the_cap_fails_permanently(settings: Settings, contracts: Contracts) -> None:
    small = settings.model_copy(update={"push_max_payload_bytes": 300})
    huge = {**SAMPLES["game.turn.ready"], "game_name": "N" * 400}
    with pytest.raises(PushPayloadError) as caught:
        channel(small, contracts).payload(push_route(variables_json=json.dumps(huge)))
    assert caught.value.reason == "payload_too_large"
    assert "HERALD_PUSH_MAX_PAYLOAD_BYTES" in caught.value.detail


async def test_a_second_copy_in_flight_is_not_published_twice(
    settings: Settings, contracts: Contracts
) -> None:
    gateway = FakeGateway()
    push = channel(settings, contracts, Clock(offset_ms=NOW - Clock().now_ms()), gateway)
    record = raw(
        contracts.channel_request.encode(push_route()),
        topic="notification.push.requested",
        key=b"u1",
    )
    view = WriteBehind({})
    first = push.handle(record, view)
    assert push.handle(record, view) == []
    await settle(push, first)
    assert len(gateway.published) == 1


async def test_the_routes_of_a_batch_are_published_together(
    settings: Settings, contracts: Contracts
) -> None:
    """Nothing goes out before the batch closes; then one write of the publishing
    entries and one write to the gateway for all of them."""
    gateway = FakeGateway()
    batches: list[int] = []

    async def write(records: Sequence[Out]) -> None:
        batches.append(len(records))

    push = channel(settings, contracts, Clock(offset_ms=NOW - Clock().now_ms()), gateway, write)
    routes = [
        raw(
            contracts.channel_request.encode(push_route(route_id=f"r-{n}")),
            topic="notification.push.requested",
            key=b"u1",
        )
        for n in range(3)
    ]
    pending = [push.handle(record, WriteBehind({})) for record in routes]
    await asyncio.sleep(0.01)
    assert (batches, gateway.published, gateway.batches) == ([], [], [])
    for outputs in [await settle(push, result) for result in pending]:
        assert [e[0] for e in statuses(list(outputs), contracts)] == ["published"]
    assert (batches, gateway.batches) == ([3], [3])


class FakeGateway:
    """Publishes into a list; ``hang`` makes publish wait forever (to cancel it)."""

    topic = "gateway.client-events"

    def __init__(self, already: dict[str, PublishReceipt] | None = None) -> None:
        self.published: list[bytes] = []
        #: How many pushes each publish_many call carried.
        self.batches: list[int] = []
        self.searched: list[tuple[str, int]] = []
        self.already = already or {}
        self.hang = False
        self.fail_with: Exception | None = None
        self.find_fails = False
        self.find_fails_with: HeraldError | None = None

    async def publish(
        self, key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> PublishReceipt:
        if self.hang:
            await asyncio.Event().wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.published.append(value)
        return PublishReceipt(0, len(self.published) - 1)

    async def publish_many(
        self, pushes: Sequence[tuple[bytes, bytes, Sequence[tuple[str, bytes]]]]
    ) -> list[PublishReceipt | HeraldError]:
        self.batches.append(len(pushes))
        results: list[PublishReceipt | HeraldError] = []
        for key, value, headers in pushes:
            try:
                results.append(await self.publish(key, value, headers))
            except HeraldError as exc:
                results.append(exc)
        return results

    async def find(self, key: bytes, route_id: str, since_ms: int) -> PublishReceipt | None:
        self.searched.append((route_id, since_ms))
        if self.find_fails_with is not None:
            raise self.find_fails_with
        if self.find_fails:
            raise GatewayUnavailableError("broker away", reason="gateway_error")
        return self.already.get(route_id)


async def settle(
    push: PushChannel, result: Sequence[Out] | Awaitable[Sequence[Out]]
) -> Sequence[Out]:
    """The outputs of ``result``, with the channel's queued publications started as
    the stage does when the batch closes."""
    push.flush()
    return await result if inspect.isawaitable(result) else result


async def test_publishing_is_written_ahead_and_a_route_in_doubt_is_looked_up(
    settings: Settings, contracts: Contracts
) -> None:
    """A route whose registry entry says ``publishing`` (its worker died after
    writing it) is looked up in the gateway topic: found, it is recorded published and
    not sent again; not found, it is published."""
    request = push_route()
    record = on_the_lane(contracts, request)
    ahead: list[Out] = []

    async def write(records: Sequence[Out]) -> None:
        ahead.extend(records)

    gateway = FakeGateway()
    clock = Clock(offset_ms=NOW - Clock().now_ms())
    push = channel(settings, contracts, clock, gateway, write)
    outputs = await settle(push, push.handle(record, WriteBehind({})))
    (entry,) = [json.loads(o.value or b"") for o in ahead]
    assert entry["state"] == "publishing"
    assert (len(gateway.published), [e[0] for e in statuses(list(outputs), contracts)]) == (
        1,
        ["published"],
    )

    left = {request.route_id.encode(): json.dumps({**entry, "p": 0}).encode()}
    found = FakeGateway({request.route_id: PublishReceipt(3, 42)})
    push = channel(settings, contracts, clock, found)
    outputs = await settle(push, push.handle(record, WriteBehind(left)))
    assert found.searched == [(request.route_id, int(entry["wall"]) - DOUBT_MARGIN_MS)]
    assert found.published == []
    assert [e[0] for e in statuses(list(outputs), contracts)] == ["published"]

    missing = FakeGateway()
    push = channel(settings, contracts, clock, missing)
    outputs = await settle(push, push.handle(record, WriteBehind(left)))
    assert (len(missing.searched), len(missing.published)) == (1, 1)
    assert [e[0] for e in statuses(list(outputs), contracts)] == ["published"]


async def test_a_cancelled_publication_is_in_doubt_in_this_process_too(
    settings: Settings, contracts: Contracts
) -> None:
    record = raw(
        contracts.channel_request.encode(push_route()),
        topic="notification.push.requested",
        key=b"u1",
    )
    gateway = FakeGateway()
    gateway.hang = True
    push = channel(settings, contracts, Clock(offset_ms=NOW - Clock().now_ms()), gateway)
    task = asyncio.ensure_future(push.handle(record, WriteBehind({})))  # type: ignore[arg-type]
    push.flush()
    await asyncio.sleep(0.01)
    task.cancel()  # a rebalance took the partition away mid-publication
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # the cancelled future's callbacks run on the next turn
    gateway.hang = False
    outputs = await settle(push, push.handle(record, WriteBehind({})))
    assert len(gateway.searched) == 1
    assert [e[0] for e in statuses(list(outputs), contracts)] == ["published"]


# --- device feedback -----------------------------------------------------------------


def feedback_record(
    settings: Settings, contracts: Contracts, user: str, token: str, partition: int | None = None
) -> Any:
    report = DeviceFeedback(user_id=user, token=token, reason="unregistered", reported_at_ms=5)
    home = partition_for(
        user.encode(), Topology.load(settings).spec("gateway.device-feedback").partitions
    )
    return raw(
        contracts.device_feedback.encode(report),
        topic="gateway.device-feedback",
        key=user.encode(),
        partition=home if partition is None else partition,
    )


def test_feedback_records_dead_tokens_per_user(settings: Settings, contracts: Contracts) -> None:
    log = DeviceFeedbackLog(stage_context(settings))
    table: dict[bytes, Any] = {}
    assert log.handle(feedback_record(settings, contracts, "u1", "tok-a"), table, NOW) == []
    assert log.handle(feedback_record(settings, contracts, "u1", "tok-b"), table, NOW) == []
    entry = invalid_tokens(table[b"u1"])
    assert entry["tok-a"]["reason"] == "unregistered"
    assert sorted(entry) == ["tok-a", "tok-b"]
    assert usable_tokens(["tok-a", "tok-c", "tok-b"], table, "u1") == ["tok-c"]
    assert usable_tokens(["tok-a"], table, "u2") == ["tok-a"]


def test_feedback_off_its_home_partition_or_broken_is_forwarded_or_kept(
    settings: Settings, contracts: Contracts
) -> None:
    log = DeviceFeedbackLog(stage_context(settings))
    table: dict[bytes, Any] = {}
    home = feedback_record(settings, contracts, "u1", "tok-a").partition
    away = feedback_record(settings, contracts, "u1", "tok-a", partition=(home + 1) % 6)
    (forward,) = log.handle(away, table, NOW)
    assert (forward.topic, forward.partition) == ("notification.push.feedback.keyed", home)
    garbage = raw(b"nope", topic="gateway.device-feedback", key=b"u1", partition=home)
    (bad,) = log.handle(garbage, table, NOW)
    assert bad.topic == "notification.malformed"
    assert contracts.malformed.decode(bad.value).reason == "undecodable"
    assert table == {}


def test_router_leaves_out_reported_tokens(settings: Settings, contracts: Contracts) -> None:
    dead = {b"u1": json.dumps({"tok-1": {"reason": "unregistered"}}).encode()}
    ctx = stage_context(settings)
    router = Router(ctx, routings(ctx, dead))
    outputs = route(router, contracts, recipient(), profile())
    assert outcomes(outputs, contracts)["push"] == ("skipped", "no_push_device")
    assert outcomes(outputs, contracts)["email"][0] == "routed"

    two = profile(push_devices=[PushDevice(token="tok-1"), PushDevice(token="tok-2")])
    outputs = route(router, contracts, recipient(), two)
    (request,) = [
        contracts.channel_request.decode(o.value)
        for o in outputs
        if o.topic == "notification.push.requested"
    ]
    assert request.device_tokens == ["tok-2"]


async def test_a_timed_out_publication_is_looked_up_before_the_retry_publishes(
    settings: Settings, contracts: Contracts
) -> None:
    """A timeout may hide a push that lands later: the retry looks first. A timeout is
    Kafka not answering (a broker restart), not the push's fault: the route waits
    without spending an attempt (issue 14). A missing topic left nothing behind: it
    spends an attempt and its retry publishes straight away."""
    request = push_route()
    record = on_the_lane(contracts, request)
    clock = Clock(offset_ms=NOW - Clock().now_ms())
    for error, first_statuses, looked_up in (
        (GatewayTimeoutError("no ack"), ["deferred"], 1),
        (
            GatewayUnavailableError("gone", reason="gateway_topic_missing"),
            ["failed", "retry_scheduled"],
            0,
        ),
    ):
        gateway = FakeGateway()
        gateway.fail_with = error
        push = channel(settings, contracts, clock, gateway)
        table: dict[bytes, Any] = {}
        view = WriteBehind(table)
        first = await settle(push, push.handle(record, view))
        view.commit()
        assert [e[0] for e in statuses(list(first), contracts)] == first_statuses
        (retry,) = [o for o in first if o.topic.endswith(".retry.5s")]
        spent = contracts.channel_request.decode(retry.value or b"").attempt
        assert spent == (0 if error.server_unavailable else 1)
        gateway.fail_with = None
        again = raw(retry.value or b"", topic="notification.push.requested", key=b"u1")
        outputs = await settle(push, push.handle(again, WriteBehind(table)))
        assert (len(gateway.searched), len(gateway.published)) == (looked_up, 1)
        assert [e[0] for e in statuses(list(outputs), contracts)] == ["published"]


async def test_a_route_waits_unspent_while_the_broker_cannot_be_read(
    settings: Settings, contracts: Contracts
) -> None:
    request = push_route()
    record = on_the_lane(contracts, request)
    entry = {"state": "publishing", "attempts": 1, "wall": 1_900_000_000_000, "p": 0}
    table = {request.route_id.encode(): json.dumps(entry).encode()}
    gateway = FakeGateway()
    gateway.find_fails_with = GatewayTimeoutError("the broker does not answer")
    push = channel(settings, contracts, Clock(offset_ms=NOW - Clock().now_ms()), gateway)
    outputs = await settle(push, push.handle(record, WriteBehind(table)))
    assert [e[0] for e in statuses(list(outputs), contracts)] == ["deferred"]
    assert not [o for o in outputs if o.topic.endswith("changelog")]  # still publishing
    assert gateway.published == []


async def test_a_route_stays_in_doubt_while_the_gateway_cannot_be_read(
    settings: Settings, contracts: Contracts
) -> None:
    request = push_route()
    record = on_the_lane(contracts, request)
    wall = 1_900_000_000_000
    table = {
        request.route_id.encode(): json.dumps(
            {"state": "publishing", "attempts": 1, "wall": wall, "p": 0}
        ).encode()
    }
    gateway = FakeGateway()
    gateway.find_fails = True
    push = channel(settings, contracts, Clock(offset_ms=NOW - Clock().now_ms()), gateway)
    outputs = await settle(push, push.handle(record, WriteBehind(table)))
    (entry,) = [json.loads(o.value or b"") for o in outputs if o.topic.endswith("changelog")]
    assert (entry["state"], entry["doubt"]) == ("retrying", str(wall))
    assert gateway.published == []


async def test_the_route_stage_hands_a_push_it_routes_now_to_the_push_channel(
    settings: Settings, contracts: Contracts
) -> None:
    """Routed now: published by the route stage, its request kept on push.routes and
    its registry entry in the attached push registry. Waiting (quiet hours): written
    to the push tiers for the push stage, as before."""
    ctx = stage_context(settings, Clock(offset_ms=NOON_UTC - Clock().now_ms()))
    gateway = FakeGateway()
    ahead: list[Out] = []

    async def write(records: Sequence[Out]) -> None:
        ahead.extend(records)

    push = PushChannel(ctx, gateway, write)  # type: ignore[arg-type]
    handoff = RouteAndPush(ctx, Router(ctx, routings(ctx, {})), push)
    registry: dict[bytes, Any] = {}
    user = profile(channels_disabled=["email"])
    view = WriteBehind(
        {b"u1": contracts.user.encode(user)},
        None,
        {PUSH_REGISTRY: WriteBehind(registry), LIMITS: WriteBehind({}), DIGESTS: WriteBehind({})},
    )
    record = raw(
        contracts.recipient.encode(recipient()), topic="notification.recipients", key=b"u1"
    )
    outputs = list(await settle(push, handoff.handle(record, view)))

    assert len(gateway.published) == 1
    assert not [o for o in outputs if o.topic == "notification.push.requested"]
    (kept,) = [o for o in outputs if o.topic == "notification.push.routes"]
    request = contracts.channel_request.decode(kept.value)
    assert sorted(outcome_pairs(outputs, contracts)) == [
        ("published", "push"),
        ("routed", "push"),
        ("skipped", "email"),
    ]
    view.commit()
    assert json.loads(registry[request.route_id.encode()])["state"] == "published"
    assert json.loads(ahead[0].value or b"")["state"] == "publishing"

    quiet = profile(quiet_hours=QuietHours(start="11:00", end="13:00"), timezone="UTC")
    view = WriteBehind(
        {b"u1": contracts.user.encode(quiet)},
        None,
        {PUSH_REGISTRY: WriteBehind({}), LIMITS: WriteBehind({}), DIGESTS: WriteBehind({})},
    )
    waiting = list(await settle(push, handoff.handle(record, view)))
    assert len(gateway.published) == 1  # not again, not yet
    (tier,) = [o for o in waiting if o.topic.startswith("notification.push.retry.")]
    assert dict(tier.headers)[TARGET] == b"notification.push.requested"


def outcome_pairs(outputs: Sequence[Out], contracts: Contracts) -> list[tuple[str, str]]:
    events = [contracts.status.decode(o.value) for o in outputs if o.topic == "notification.status"]
    return [(e.status, e.channel or "") for e in events]
