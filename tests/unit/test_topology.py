"""The declared topology, the catalog and the partitioner."""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from pipeline.errors import ConfigurationError
from pipeline.settings import Settings
from pipeline.topology import Catalog, Topology
from pipeline.topology.model import parse_duration
from pipeline.topology.partitioning import murmur2, partition_for


@pytest.fixture
def doc(settings: Settings) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((settings.topology_dir / "topics.yaml").read_text())
    return data


def test_every_flow_topic_is_declared(settings: Settings) -> None:
    topology = Topology.load(settings)
    for name in [
        "notification.intents",
        "notification.intents.keyed",
        "notification.intents.malformed",
        "notification.recipients",
        "notification.users",
        "notification.email.requested",
        "notification.push.requested",
        "notification.email.dlq",
        "notification.push.dlq",
        "notification.status",
        "gateway.client-events",
        "herald.intake.idempotency.changelog",
        "herald.users.changelog",
        "notification.email.retry.10s",
        "notification.push.retry.5s",
    ]:
        assert topology.spec(name)
    assert topology.retry["email"].budget == 7
    assert topology.retry["push"].budget == 3


@pytest.mark.parametrize(("profile", "rf", "isr"), [("local", 1, "1"), ("production", 3, "2")])
def test_profiles_set_replication(settings: Settings, profile: str, rf: int, isr: str) -> None:
    topology = Topology.from_file(settings.topology_dir / "topics.yaml", profile)
    assert {t.replication_factor for t in topology.topics.values()} == {rf}
    assert {t.config["min.insync.replicas"] for t in topology.topics.values()} == {isr}


def test_tables_and_their_streams_are_copartitioned(settings: Settings) -> None:
    for profile in ("local", "production"):
        topology = Topology.from_file(settings.topology_dir / "topics.yaml", profile)
        for group in topology.groups().values():
            assert len({t.partitions for t in group}) == 1
        assert (
            topology.spec("herald.intake.idempotency.changelog").partitions
            == topology.spec("notification.intents").partitions
            == topology.spec("notification.intents.keyed").partitions
        )
        assert (
            topology.spec("herald.users.changelog").partitions
            == topology.spec("notification.recipients").partitions
            == topology.spec("notification.users").partitions
        )


def test_a_partition_count_that_breaks_its_group_is_refused(doc: dict[str, Any]) -> None:
    broken = copy.deepcopy(doc)
    broken["topics"]["herald.intake.idempotency.changelog"]["partitions"] = 5
    with pytest.raises(ConfigurationError, match="group"):
        Topology.from_dict(broken, "local")


def test_unknown_group_and_profile_are_refused(doc: dict[str, Any]) -> None:
    broken = copy.deepcopy(doc)
    broken["topics"]["notification.status"]["group"] = "nowhere"
    with pytest.raises(ConfigurationError, match="nowhere"):
        Topology.from_dict(broken, "local")
    with pytest.raises(ConfigurationError, match="profile"):
        Topology.from_dict(doc, "staging")


def test_each_channel_names_its_lanes_dlq_registry_and_retry_policy(doc: dict[str, Any]) -> None:
    topology = Topology.from_dict(doc, "local")
    email = topology.channel("email")
    assert email.lanes == {
        "bulk": "notification.email.requested",
        "priority": "notification.email.priority",
        "high": "notification.email.high",
        "low": "notification.email.low",
    }
    assert [email.lane_for(p) for p in ("critical", "high", "normal", "low")] == [
        "notification.email.priority",
        "notification.email.high",
        "notification.email.requested",
        "notification.email.low",
    ]
    webhook = topology.channel("webhook")
    assert webhook.lane_for("critical") == "notification.webhook.requested"
    assert (webhook.dlq, webhook.registry) == (
        "notification.webhook.dlq",
        "herald.webhook.deliveries.changelog",
    )
    assert topology.lanes()["notification.push.requested"] == "push"
    with pytest.raises(ConfigurationError, match="channel 'fax' is not declared"):
        topology.channel("fax")


@pytest.mark.parametrize(
    ("lanes", "message"),
    [
        ({"urgent": "fast"}, "declared per priority"),
        ({"high": "requested"}, "bad lane name"),
        ({"high": "Fast Lane"}, "bad lane name"),
        ({"high": "fast"}, "needs topic 'notification.webhook.fast'"),
    ],
)
def test_a_bad_lane_is_refused(doc: dict[str, Any], lanes: dict[str, str], message: str) -> None:
    broken = copy.deepcopy(doc)
    broken["channels"]["webhook"] = {"lanes": lanes}
    with pytest.raises(ConfigurationError, match=message):
        Topology.from_dict(broken, "local")


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        (("topics", "notification.webhook.dlq"), "needs topic 'notification.webhook.dlq'"),
        (("retry", "webhook"), "channel 'webhook' has no retry policy"),
    ],
)
def test_a_channel_missing_a_topic_or_its_retry_policy_is_refused(
    doc: dict[str, Any], remove: tuple[str, str], message: str
) -> None:
    broken = copy.deepcopy(doc)
    del broken[remove[0]][remove[1]]
    with pytest.raises(ConfigurationError, match=message):
        Topology.from_dict(broken, "local")


def test_a_lane_outside_the_users_group_is_refused(doc: dict[str, Any]) -> None:
    broken = copy.deepcopy(doc)
    broken["topics"]["notification.webhook.requested"]["group"] = "ops"
    with pytest.raises(ConfigurationError, match="users group"):
        Topology.from_dict(broken, "local")


def test_durations() -> None:
    assert [parse_duration(t) for t in ("500ms", "10s", "5m", "2h", "1d")] == [
        0.5,
        10,
        300,
        7200,
        86400,
    ]
    with pytest.raises(ConfigurationError):
        parse_duration("soon")


def test_partitioner_matches_the_java_client() -> None:
    # Reference values of org.apache.kafka.common.utils.Utils.murmur2 (Java client).
    assert partition_for(b"21", 1000) == (-973932308 & 0x7FFFFFFF) % 1000
    assert partition_for(b"foobar", 1000) == (-790332482 & 0x7FFFFFFF) % 1000


def test_murmur2_is_aiokafkas_for_keys_of_every_length() -> None:
    rng = random.Random(1)
    for length in range(130):
        for _ in range(10):
            key = rng.randbytes(length)
            assert murmur2(key) == aiokafka_murmur2(key), key


def test_catalog_holds_the_v1_types(settings: Settings) -> None:
    catalog = Catalog.load(settings)
    for name in [
        "game.turn.ready",
        "game.finished",
        "game.generation_failed",
        "lobby.runtime_paused_after_start",
        "lobby.application.submitted",
        "lobby.membership.approved",
        "lobby.membership.rejected",
        "lobby.invite.created",
        "lobby.invite.redeemed",
        "lobby.invite.expired",
        "lobby.invite.revoked",
        "geo.review_recommended",
        "auth.login_code",
    ]:
        assert catalog.get(name) is not None, name
    submitted = catalog.get("lobby.application.submitted")
    assert submitted is not None
    assert set(submitted.channels) == {"user", "admin_email"}
    assert submitted.channels["admin_email"] == ("email",)
    revoked = catalog.get("lobby.invite.revoked")
    assert revoked is not None
    assert revoked.produces_nothing


def test_catalog_is_extended_without_code(tmp_path: Path, settings: Settings) -> None:
    text = (settings.topology_dir / "catalog.yaml").read_text()
    text += "  shop.order.shipped:\n    channels: {user: [email]}\n    required: [order_id]\n"
    (tmp_path / "catalog.yaml").write_text(text)
    shutil.copy(settings.topology_dir / "topics.yaml", tmp_path / "topics.yaml")
    catalog = Catalog.load(Settings(topology_dir=tmp_path))
    shipped = catalog.get("shop.order.shipped")
    assert shipped is not None
    assert shipped.required == ("order_id",)
    assert shipped.category == "shop"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"channels": {"admin_email": ["push"]}, "admin_list": "ops"}, "email only"),
        ({"channels": {"user": ["pigeon"]}}, r"unknown channels \['pigeon'\]"),
        ({"channels": {"robots": ["email"]}}, "unknown audience"),
        ({"channels": {"admin_email": ["email"]}, "admin_list": "nobody"}, "admin_list"),
        ({"channels": {"user": ["email"]}, "fallback": {}}, "two user channels"),
        ({"channels": {"user": ["email"]}, "in_doubt": "maybe"}, "in_doubt must be one of"),
        (
            {"channels": {"user": ["push", "email"]}, "fallback": {"when": ["bounced"]}},
            r"fallback when \['bounced'\]",
        ),
    ],
)
def test_catalog_mistakes_are_refused(entry: dict[str, Any], message: str) -> None:
    doc = {"admin_lists": {"ops": ["ops@example.org"]}, "types": {"x.y": entry}}
    with pytest.raises(ConfigurationError, match=message):
        Catalog.from_dict(doc, ("email", "push"))
