"""Digests in the route stage: routes of a digest type fold into one route per user,
type and channel, sent at the size cap or when the window's close marker returns."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import yaml

from pipeline.contracts import Contracts
from pipeline.contracts.records import ChannelRequest, PushDevice, Recipient, UserProfile
from pipeline.errors import ConfigurationError
from pipeline.runtime.records import Out, RawRecord
from pipeline.settings import Settings
from pipeline.stages.channels import routings
from pipeline.stages.delay import DUE_AT, TARGET
from pipeline.stages.digest import DIGEST_CLOSE, check_templates
from pipeline.stages.route import Router, RouteTables
from pipeline.topology import Catalog
from pipeline.topology.limits import Limits
from tests.unit.helpers import raw, stage_context

NEWS = {
    "category": "news",
    "channels": {"user": ["push", "email"]},
    "required": {"headline": "string"},
    "push_ttl_s": 60,
    "push_payload": "GameTurnReady",
    "digest": {"window": "15m", "max_items": 3},
}


def catalog_with(settings: Settings, **types: dict[str, Any]) -> Catalog:
    doc = yaml.safe_load((settings.topology_dir / "catalog.yaml").read_text())
    doc["types"].update(types)
    return Catalog.from_dict(doc, ["email", "push", "webhook", "slack", "sms", "inapp"])


@pytest.fixture
def router(settings: Settings) -> Router:
    ctx = stage_context(settings)
    ctx = dataclasses.replace(ctx, catalog=catalog_with(settings, **{"news.item": NEWS}))
    return Router(ctx, routings(ctx, {}))


def item(n: int, priority: str = "normal") -> Recipient:
    return Recipient(
        notification_id=f"n-{n}",
        notification_type="news.item",
        audience_kind="user",
        user_id="u1",
        producer="press",
        idempotency_key=f"k-{n}",
        occurred_at_ms=1,
        accepted_at_ms=1,
        priority=priority,
        payload_json=json.dumps({"headline": f"story {n}"}),
    )


USER = UserProfile(user_id="u1", email="u1@example.org", push_devices=[PushDevice(token="t")])


class Stage:
    """The route stage over one user, its tables kept between records."""

    def __init__(self, router: Router, contracts: Contracts) -> None:
        self.router, self.contracts = router, contracts
        self.tables = RouteTables(limits={}, digests={})
        self.users = {b"u1": contracts.user.encode(USER)}

    def route(self, rec: Recipient, now: int = 1_000) -> list[Out]:
        record = raw(
            self.contracts.recipient.encode(rec), topic="notification.recipients", key=b"u1"
        )
        return self.router.handle(record, self.users, now, self.tables)

    def returned(self, marker: Out, now: int) -> list[Out]:
        """The close marker as it comes back from its tier to the route stage."""
        headers = tuple((k, v) for k, v in marker.headers if k not in (TARGET, DUE_AT))
        back = RawRecord("notification.recipients.rejoin", 0, 0, now, b"u1", b"", headers)
        return self.router.handle(back, self.users, now, self.tables)

    def events(self, outputs: list[Out]) -> list[tuple[str | None, str, str | None]]:
        decoded = (
            self.contracts.status.decode(o.value)
            for o in outputs
            if o.topic == "notification.status"
        )
        return [(e.channel, e.status, e.detail) for e in decoded]

    def digests(self, outputs: list[Out]) -> list[ChannelRequest]:
        return [
            self.contracts.channel_request.decode(o.value)
            for o in outputs
            if o.topic == "notification.email.requested"
        ]


def test_routes_fold_into_a_digest_sent_at_its_cap(router: Router, settings: Settings) -> None:
    stage = Stage(router, Contracts(settings))
    first = stage.route(item(1))
    (marker,) = [o for o in first if dict(o.headers).get(DIGEST_CLOSE)]
    assert dict(marker.headers)[TARGET] == b"notification.recipients.rejoin"
    assert int(dict(marker.headers)[DUE_AT]) == 1_000 + 15 * 60 * 1000
    events = stage.events(first)
    (digested,) = [e for e in events if e[0] == "email"]
    assert digested[1] == "digested"
    digest_id = digested[2]
    assert ("push", "routed") in {(c, s) for c, s, _ in events}  # push is never folded
    stage.route(item(2))
    third = stage.route(item(3))
    (digest,) = stage.digests(third)
    assert digest.route_id == digest_id
    assert digest.template_id == "news.item.digest"
    assert json.loads(digest.variables_json) == {
        "items": [{"headline": "story 1"}, {"headline": "story 2"}, {"headline": "story 3"}],
        "count": 3,
    }
    assert digest.address == "u1@example.org"
    assert ("email", "routed", "digest of 3 routes") in stage.events(third)
    assert stage.tables.digests == {}
    # The first window's marker comes back after its digest went: nothing.
    assert stage.returned(marker, 1_000 + 15 * 60 * 1000) == []


def test_an_open_digest_goes_when_its_window_closes(router: Router, settings: Settings) -> None:
    stage = Stage(router, Contracts(settings))
    (marker,) = [o for o in stage.route(item(1), now=5_000) if dict(o.headers).get(DIGEST_CLOSE)]
    stage.route(item(2, priority="critical"), now=6_000)  # critical: sent on its own
    stage.route(item(3), now=7_000)
    router_ctx_cancel = router._cancellations
    router_ctx_cancel.put(b"n-3", {"by": "operator"})
    closed = stage.returned(marker, 905_000)
    (digest,) = stage.digests(closed)
    assert json.loads(digest.variables_json)["items"] == [{"headline": "story 1"}]
    events = stage.events(closed)
    assert ("email", "cancelled", "by operator") in events  # story 3, left out
    assert stage.tables.digests == {}


@pytest.mark.parametrize(
    "digest",
    [
        {"window": "soon"},
        {"max_items": 1},
        {"when": "sometimes"},
        {"channels": ["push"]},
        {"every": "1h"},
    ],
)
def test_a_bad_digest_is_refused(settings: Settings, digest: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="digest"):
        catalog_with(settings, **{"news.item": {**NEWS, "digest": digest}})


def test_a_digest_type_needs_its_digest_template(settings: Settings) -> None:
    ctx = stage_context(settings)
    catalog = catalog_with(settings, **{"news.item": NEWS})
    with pytest.raises(ConfigurationError, match=r"news\.item\.digest"):
        check_templates(catalog, ctx.templates)
    check_templates(ctx.catalog, ctx.templates)  # the shipped catalog has no digests


def test_when_limited_only_what_a_user_limit_would_hold_is_folded(settings: Settings) -> None:
    ctx = stage_context(settings)
    news = {**NEWS, "digest": {"window": "1h", "max_items": 10, "when": "limited"}}
    ctx = dataclasses.replace(
        ctx,
        catalog=catalog_with(settings, **{"news.item": news}),
        limits=Limits.from_dict({"users": [{"channel": "email", "max": 2, "per": "1h"}]}),
    )
    stage = Stage(Router(ctx, routings(ctx, {})), ctx.contracts)
    outcomes = []
    for n in range(1, 5):
        events = stage.events(stage.route(item(n)))
        outcomes += [status for channel, status, _ in events if channel == "email"]
    # Two fit the hour and go one by one; the rest, which the limit would hold, fold.
    assert outcomes == ["routed", "routed", "digested", "digested"]
    assert list(stage.tables.limits[b"u1"]["email|*"].values()) == [2]  # type: ignore[index]
