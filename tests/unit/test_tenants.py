"""Tenants: a user's limit counts are kept per tenant and a declared tenant may have
user limits of its own; HTTP intake rates are per tenant (a tenant-wide rate, and a
producer name in one tenant never spends another's); tenant metrics labels stay
bounded; status events and the delivery listing carry and filter by tenant_id."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from prometheus_client import REGISTRY

from pipeline import metrics
from pipeline.contracts import Contracts
from pipeline.contracts.records import StatusEvent
from pipeline.errors import ConfigurationError, RateLimitedError
from pipeline.settings import Settings
from pipeline.stages.channels import routings
from pipeline.stages.route import Router, RouteTables
from pipeline.topology.limits import Limits
from pipeline.web.intents import ProducerLimits
from pipeline.web.status_store import DeliveryQuery, StatusStore
from tests.unit.helpers import raw, stage_context
from tests.unit.test_route import NOON_UTC, profile, recipient

LIMITS: dict[str, Any] = {
    "producers": {"*": {"per_second": 1, "burst": 2}},
    "users": [{"channel": "email", "max": 1, "per": "1h"}],
    "tenants": {
        "acme": {"intake": {"per_second": 1, "burst": 3}},
        "globex": {"users": [{"channel": "email", "max": 2, "per": "1h"}]},
    },
}


def test_tenants_load_and_are_checked() -> None:
    limits = Limits.from_dict(LIMITS)
    assert limits.tenant("acme") is not None
    assert limits.tenant("initech") is None
    assert [u.most for u in limits.for_user("email", "game", "globex")] == [2]
    assert [u.most for u in limits.for_user("email", "game", "acme")] == [1]  # the default
    assert Limits.from_dict(
        {"tenants": {"globex": {"users": [{"channel": "email", "max": 1, "per": "1h"}]}}}
    ).limits_users
    with pytest.raises(ConfigurationError, match=r"tenants\.acme"):
        Limits.from_dict({"tenants": {"acme": {"rate": 5}}})
    with pytest.raises(ConfigurationError, match="does not declare"):
        Limits.from_dict(
            {"tenants": {"a": {"users": [{"channel": "fax", "max": 1, "per": "1h"}]}}}
        ).check(("email",))


def test_a_users_counts_are_kept_per_tenant(settings: Settings) -> None:
    contracts = Contracts(settings)
    ctx = dataclasses.replace(stage_context(settings), limits=Limits.from_dict(LIMITS))
    router = Router(ctx, routings(ctx, {}))
    limits: dict[bytes, Any] = {}

    def email(n: int, tenant: str | None) -> str:
        rec = recipient(notification_id=f"n-{n}", tenant_id=tenant)
        record = raw(contracts.recipient.encode(rec), topic="notification.recipients", key=b"u1")
        users = {b"u1": contracts.user.encode(profile())}
        outputs = router.handle(record, users, NOON_UTC, RouteTables(limits=limits))
        events = [contracts.status.decode(o.value) for o in outputs if "status" in o.topic]
        (event,) = [e for e in events if e.channel == "email"]
        assert event.tenant_id == tenant  # status events carry the tenant
        return event.status

    # One per hour by default, for each tenant apart: acme's route does not fill the
    # window of the user's route without a tenant.
    assert [email(1, None), email(2, None)] == ["routed", "deferred"]
    assert [email(3, "acme"), email(4, "acme")] == ["routed", "deferred"]
    # globex has limits of its own: two per hour.
    assert [email(5, "globex"), email(6, "globex"), email(7, "globex")] == [
        "routed",
        "routed",
        "deferred",
    ]
    assert sorted(limits[b"u1"]) == ["acme/email|*", "email|*", "globex/email|*"]


def test_intake_rates_are_per_tenant() -> None:
    now = [0.0]
    limits = ProducerLimits(Limits.from_dict(LIMITS), clock=lambda: now[0])
    # A producer name in two tenants: two buckets (burst 2 each).
    for tenant in ("globex", "initech"):
        limits.spend("game-master", tenant)
        limits.spend("game-master", tenant)
        with pytest.raises(RateLimitedError, match="producer 'game-master'"):
            limits.spend("game-master", tenant)
    # acme's whole intake: 3 at once, whatever producer sends them.
    for producer in ("a", "b", "c"):
        limits.spend(producer, "acme")
    with pytest.raises(RateLimitedError, match="tenant 'acme'") as refused:
        limits.spend("d", "acme")
    assert refused.value.retry_after_s == 1
    now[0] = 1.0
    limits.spend("d", "acme")


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_tenant_labels_stay_bounded() -> None:
    metrics.declare_tenants(["acme"])
    try:
        before = {
            t: sample("herald_tenant_intents_total", tenant=t, outcome="accepted")
            for t in ("acme", "other", "none")
        }
        metrics.count(
            metrics.Note("status", "accepted", tenant=t)
            for t in ("acme", "acme", "tenant-of-the-day-1", "tenant-of-the-day-2", "")
        )
        after = {
            t: sample("herald_tenant_intents_total", tenant=t, outcome="accepted")
            for t in ("acme", "other", "none")
        }
        assert {t: after[t] - before[t] for t in after} == {"acme": 2, "other": 2, "none": 1}
        assert (
            sample("herald_tenant_intents_total", tenant="tenant-of-the-day-1", outcome="accepted")
            == 0
        )
    finally:
        metrics.declare_tenants([])


def test_the_delivery_listing_filters_by_tenant() -> None:
    store = StatusStore(":memory:")
    for n, tenant in enumerate(["acme", "globex", "acme", None]):
        event = StatusEvent(
            event_id=f"e{n}",
            status="sent",
            at_ms=n,
            notification_id=f"n{n}",
            route_id=f"r{n}",
            channel="email",
            tenant_id=tenant,
            template_version="abc123def456",
        )
        store.apply([event], "status", {0: n + 1})
    page, _ = store.deliveries(DeliveryQuery(tenant_id="acme"), limit=10, after=None)
    assert [(d["route_id"], d["tenant_id"]) for d in page] == [("r0", "acme"), ("r2", "acme")]
    assert page[0]["template_version"] == "abc123def456"
    notification = store.notification("n1")
    assert notification is not None
    assert notification["tenant_id"] == "globex"
