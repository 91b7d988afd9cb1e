"""The channel interface and the newer channels' pure parts: rendering for Slack, SMS
and the inbox, request bodies, addresses, start-up checks, and the Twilio-compatible
provider against a local aiohttp server."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import yaml
from aiohttp import web
from pydantic import SecretStr

from pipeline.contracts.inbox import InboxEntry, decode_entry, encode_entry, inbox_record
from pipeline.contracts.records import ChannelRequest, UserProfile
from pipeline.errors import ConfigurationError, DecodeError, HttpRejectedError, RenderError
from pipeline.errors import ValidationError as HeraldValidationError
from pipeline.providers.http import HttpPoster
from pipeline.providers.sms import TwilioSms
from pipeline.rendering import TemplateCatalog
from pipeline.settings import Settings
from pipeline.stages.channels import DIRECT, routings
from pipeline.stages.slack import slack_body, webhook_path
from pipeline.stages.users import check_profile
from pipeline.stages.webhook import WebhookKind, url_problem, webhook_body
from pipeline.topology import Catalog
from pipeline.topology.partitioning import partition_for
from tests.unit.helpers import served, stage_context


def templates(tmp_path: Path, parts: dict[str, str]) -> TemplateCatalog:
    folder = tmp_path / "templates" / "t.x" / "en"
    folder.mkdir(parents=True)
    for part, text in parts.items():
        (folder / f"{part}.j2").write_text(text)
    return TemplateCatalog(tmp_path / "templates")


def test_slack_escapes_every_value_but_not_the_template(tmp_path: Path) -> None:
    catalog = templates(tmp_path, {"slack": "<https://x.example|Open> {{ a }} & {{ b }}"})
    text, locale = catalog.render_text(
        "t.x", "slack", "de", {"a": "<!channel>", "b": "<https://evil|x> & y"}
    )
    assert locale == "en"
    assert text == "<https://x.example|Open> &lt;!channel&gt; & &lt;https://evil|x&gt; &amp; y"


def test_sms_text_is_plain_and_a_missing_part_is_a_render_error(tmp_path: Path) -> None:
    catalog = templates(tmp_path, {"sms": "  Hi {{ a }} <b>  "})
    assert catalog.render_text("t.x", "sms", "en", {"a": "&"}) == ("Hi & <b>", "en")
    with pytest.raises(RenderError, match="no slack template"):
        catalog.render_text("t.x", "slack", "en", {})
    with pytest.raises(RenderError, match="missing required variables"):
        catalog.render_text("t.x", "sms", "en", {}, required=("a",))


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (
            {"inapp_title": "I {{ a }}", "inapp_body": "IB", "push_title": "P", "push_body": "PB"},
            ("I 1", "IB"),
        ),
        ({"push_title": "P {{ a }}\nmore", "push_body": "PB", "subject": "S"}, ("P 1 more", "PB")),
        ({"subject": "S {{ a }}", "text": "T"}, ("S 1", "T")),
    ],
)
def test_an_inbox_entry_takes_inapp_then_push_then_mail_texts(
    tmp_path: Path, parts: dict[str, str], expected: tuple[str, str]
) -> None:
    title, body, _ = templates(tmp_path, parts).render_inapp("t.x", "en", {"a": 1})
    assert (title, body) == expected


def test_slack_body_splits_into_blocks_slack_accepts() -> None:
    body = json.loads(slack_body("x" * 7000))
    assert body["text"] == "x" * 7000
    assert [len(b["text"]["text"]) for b in body["blocks"]] == [3000, 3000, 1000]
    assert {b["text"]["type"] for b in body["blocks"]} == {"mrkdwn"}
    with pytest.raises(RenderError, match="Slack takes 50"):
        slack_body("x" * 3000 * 51)
    with pytest.raises(RenderError, match="nothing"):
        slack_body("")


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("https://hooks.slack.com/services/T0/B0/abc", "/services/T0/B0/abc"),
        ("http://hooks.slack.com/services/T0/B0/abc", None),
        ("https://hooks.slack.com.evil.example/services/x", None),
        ("https://hooks.slack.com:8443/services/x", None),
        ("https://hooks.slack.com/api/x", None),
        ("https://hooks.slack.com/services/x?redirect=1", None),
        ("not a url", None),
    ],
)
def test_only_slack_incoming_webhook_urls_are_taken(url: str, path: str | None) -> None:
    assert webhook_path(url) == path


def request(**fields: Any) -> ChannelRequest:
    values: dict[str, Any] = {
        "route_id": "r-1",
        "notification_id": "n-1",
        "notification_type": "shop.order.shipped",
        "channel": "webhook",
        "template_id": "shop.order.shipped",
        "user_id": "u1",
        "address": "https://hooks.example/x",
        "variables_json": '{"order_id": "ö-1", "n": [1, 2]}',
        "occurred_at_ms": 1_700_000_000_000,
    }
    values.update(fields)
    return ChannelRequest(**values)


def test_a_webhook_body_carries_the_route_and_the_payload_as_written() -> None:
    body = json.loads(webhook_body(request()))
    assert body["type"] == "shop.order.shipped"
    assert body["timestamp"] == "2023-11-14T22:13:20+00:00"
    assert body["data"]["route_id"] == "r-1"
    assert body["data"]["user_id"] == "u1"
    assert body["data"]["payload"] == {"order_id": "ö-1", "n": [1, 2]}


@pytest.mark.parametrize(
    ("url", "https_only", "problem"),
    [
        ("https://hooks.example/x", True, None),
        ("http://hooks.example/x", True, "scheme 'http' is not https"),
        ("http://127.0.0.1:8080/x", False, None),
        ("ftp://hooks.example/x", False, "scheme 'ftp'"),
        ("https:///x", True, "no host"),
        ("https://user:pw@hooks.example/x", True, "credentials"),
        ("https://hooks.example/" + "x" * 2048, True, "longer than 2048"),
    ],
)
def test_webhook_urls_herald_calls(url: str, https_only: bool, problem: str | None) -> None:
    found = url_problem(url, https_only)
    assert found is None if problem is None else problem in (found or "")


def test_each_channel_addresses_a_user_or_says_why_not(settings: Settings) -> None:
    ctx = stage_context(settings)
    routes = routings(ctx, {})
    assert set(routes) == set(ctx.topology.channels) == {*DIRECT, "push"}
    spec = ctx.catalog.types["game.turn.ready"]
    nobody = UserProfile(user_id="u1")
    assert {name: r.address(nobody, spec) for name, r in routes.items()} == {
        "email": "no_email_address",
        "push": "no_push_device",
        "webhook": "no_webhook_endpoint",
        "slack": "no_slack_webhook",
        "sms": "no_phone_number",
        "inapp": routes["inapp"].address(nobody, spec),  # every user has an inbox
    }
    odd = UserProfile(
        user_id="u1",
        contacts={"webhook": "http://x.example/", "slack": "https://x.example/", "sms": "12"},
    )
    assert routes["webhook"].address(odd, spec) == "invalid_webhook_url"
    assert routes["slack"].address(odd, spec) == "invalid_slack_webhook"
    assert routes["sms"].address(odd, spec) == "invalid_phone_number"
    fine = UserProfile(user_id="u1", contacts={"sms": "+49 (151) 2345-6789"})
    assert routes["sms"].address(fine, spec).address == "+4915123456789"  # type: ignore[union-attr]


def test_a_worker_runs_the_channels_its_catalog_uses(settings: Settings) -> None:
    catalog = stage_context(settings).catalog
    assert catalog.channels() == {"email", "push"}
    doc = {"types": {"t.x": {"channels": {"user": ["sms", "inapp"]}}}}
    assert Catalog.from_dict(doc, DIRECT).channels() == {"email", "push", "sms", "inapp"}


def test_a_channel_without_a_module_stops_the_start_up(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "topologies"
    folder.mkdir()
    (folder / "catalog.yaml").write_text((settings.topology_dir / "catalog.yaml").read_text())
    doc = yaml.safe_load((settings.topology_dir / "topics.yaml").read_text())
    doc["channels"]["fax"] = {}
    for topic in ("notification.fax.requested", "herald.fax.deliveries.changelog"):
        doc["topics"][topic] = {"group": "users"}
    doc["topics"]["notification.fax.dlq"] = {"group": "ops"}
    doc["retry"]["fax"] = {"budget": 2, "tiers": ["1s"]}
    (folder / "topics.yaml").write_text(yaml.safe_dump(doc))
    ctx = stage_context(settings.model_copy(update={"topology_dir": folder}))
    with pytest.raises(ConfigurationError, match=r"no module for: \[.fax.\]"):
        routings(ctx, {})


def test_a_webhook_type_needs_its_secret_and_its_named_endpoint(
    settings: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "topologies"
    folder.mkdir()
    (folder / "topics.yaml").write_text((settings.topology_dir / "topics.yaml").read_text())
    doc = yaml.safe_load((settings.topology_dir / "catalog.yaml").read_text())
    doc["types"]["shop.x"] = {"channels": {"user": ["webhook"]}, "webhook_endpoint": "orders"}
    (folder / "catalog.yaml").write_text(yaml.safe_dump(doc))
    base = settings.model_copy(update={"topology_dir": folder})
    with pytest.raises(ConfigurationError, match="'orders', which HERALD_WEBHOOK_ENDPOINTS"):
        WebhookKind(stage_context(base))
    named = base.model_copy(update={"webhook_endpoints": {"orders": "https://h.example/o"}})
    with pytest.raises(ConfigurationError, match="set HERALD_WEBHOOK_SECRET"):
        WebhookKind(stage_context(named))
    short = named.model_copy(update={"webhook_secret": SecretStr("whsec_c2hvcnQ=")})
    with pytest.raises(ConfigurationError, match="holds 5 bytes") as refused:
        WebhookKind(stage_context(short))
    assert "c2hvcnQ" not in str(refused.value)
    good = "whsec_" + base64.b64encode(b"k" * 32).decode()
    WebhookKind(stage_context(named.model_copy(update={"webhook_secret": SecretStr(good)})))


def test_dict_settings_reach_a_child_process_as_json_secrets_included() -> None:
    settings = Settings(
        webhook_endpoints={"a": "https://h.example/a"},
        slack_webhooks={"ops": SecretStr("https://hooks.slack.com/services/T/B/s")},
    )
    env = settings.as_env()
    assert json.loads(env["HERALD_WEBHOOK_ENDPOINTS"]) == {"a": "https://h.example/a"}
    assert json.loads(env["HERALD_SLACK_WEBHOOKS"]) == {
        "ops": "https://hooks.slack.com/services/T/B/s"
    }
    again = Settings.model_validate(
        {"slack_webhooks": json.loads(env["HERALD_SLACK_WEBHOOKS"])}
    ).slack_webhooks["ops"]
    assert again.get_secret_value().endswith("/s")


@pytest.mark.parametrize(
    ("contacts", "reason"),
    [
        ({"sms": "0151 2345678"}, "invalid_phone_number"),
        ({"sms": "+1 800 FLOWERS"}, "invalid_phone_number"),
        ({f"c{i}": "x" for i in range(17)}, "profile_too_large"),
        ({"webhook": "https://h.example/" + "x" * 2048}, "profile_too_large"),
    ],
)
def test_a_profile_with_unusable_contacts_is_refused_at_the_door(
    contacts: dict[str, str], reason: str
) -> None:
    with pytest.raises(HeraldValidationError) as refused:
        check_profile(UserProfile(user_id="u1", contacts=contacts))
    assert refused.value.reason == reason


def test_inbox_entries_round_trip_and_go_to_their_users_partition() -> None:
    entry = InboxEntry(
        user_id="u:1",
        notification_id="n-1",
        route_id="r-1",
        notification_type="t.x",
        title="Tïtle",
        body="Body",
        locale="en",
        created_at_ms=5,
    )
    assert decode_entry(encode_entry(entry)) == entry
    assert decode_entry(encode_entry(entry.read(9))).read_at_ms == 9
    record = inbox_record("inbox", 6, entry)
    assert record.key == b"u:1:n-1"
    assert record.key.decode().rpartition(":")[::2] == ("u:1", "n-1")
    assert record.partition == partition_for(b"u:1", 6)
    with pytest.raises(DecodeError):
        decode_entry(b'{"user_id": "u1"}')


received: list[tuple[str, bytes, dict[str, str]]] = []


async def messages(request: web.Request) -> web.Response:
    body = await request.read()
    received.append((request.path, body, dict(request.headers)))
    if parse_qs(body.decode())["To"] == ["+15550000000"]:
        return web.json_response({"code": 21211, "message": "invalid To"}, status=400)
    return web.json_response({"sid": "SM123", "status": "queued"}, status=201)


@pytest.fixture
async def twilio() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", messages)
    received.clear()
    async with served(app) as url:
        yield url


async def test_the_twilio_provider_posts_a_form_with_basic_auth(twilio: str) -> None:
    settings = Settings(
        sms_provider="twilio",
        sms_base_url=twilio,
        sms_account_sid="AC1",
        sms_auth_token=SecretStr("tok"),
        sms_from="MG42",
    )
    provider = TwilioSms(settings, HttpPoster(settings))
    try:
        receipt = await provider.send("+4915123456789", "Hällo", "r-1")
        assert (receipt.provider_id, receipt.status) == ("SM123", "queued")
        with pytest.raises(HttpRejectedError) as refused:
            await provider.send("+15550000000", "x", "r-2")
        assert refused.value.code == 400
        assert "21211" in refused.value.detail
    finally:
        await provider.close()
    path, body, headers = received[0]
    assert path == "/2010-04-01/Accounts/AC1/Messages.json"
    assert parse_qs(body.decode()) == {
        "To": ["+4915123456789"],
        "MessagingServiceSid": ["MG42"],
        "Body": ["Hällo"],
    }
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"AC1:tok").decode()
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_the_twilio_provider_needs_its_credentials() -> None:
    settings = Settings(sms_provider="twilio", sms_account_sid="AC1")
    with pytest.raises(ConfigurationError, match="HERALD_SMS_AUTH_TOKEN"):
        TwilioSms(settings, HttpPoster(settings))
