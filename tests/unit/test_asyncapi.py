"""docs/asyncapi.yaml: current with topologies/ and schemas/, valid AsyncAPI 3.0.0, and
naming every topic with its key, records, partitions, retention and roles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from pipeline.errors import ConfigurationError
from pipeline.ops import asyncapi
from pipeline.ops.cli import cli
from pipeline.settings import REPO_ROOT
from pipeline.topology import Topology

CHECKED_IN = REPO_ROOT / "docs" / "asyncapi.yaml"
TOPICS = REPO_ROOT / "topologies" / "topics.yaml"
#: The AsyncAPI 3.0.0 JSON Schema, as npm's @asyncapi/specs 6.11.1 publishes it
#: (schemas/3.0.0-without-$id.json, Apache-2.0).
SPEC = Path(__file__).parent.parent / "data" / "asyncapi-3.0.0.schema.json"


def generated() -> str:
    profiles = [Topology.from_file(TOPICS, p) for p in ("production", "local")]
    return asyncapi.render(asyncapi.document(profiles, REPO_ROOT / "schemas"))


def test_the_checked_in_document_is_current() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == generated(), (
        "docs/asyncapi.yaml is stale: run `herald asyncapi --output docs/asyncapi.yaml`"
    )


def test_herald_asyncapi_prints_and_writes_it(tmp_path: Path) -> None:
    printed = CliRunner().invoke(cli, ["asyncapi"])
    assert printed.exit_code == 0, printed.output
    assert printed.output == generated()
    written = CliRunner().invoke(cli, ["asyncapi", "--output", str(tmp_path / "a.yaml")])
    assert written.exit_code == 0, written.output
    assert (tmp_path / "a.yaml").read_text() == generated()


def test_it_is_valid_asyncapi_3() -> None:
    spec = json.loads(SPEC.read_text(encoding="utf-8"))
    document = yaml.safe_load(CHECKED_IN.read_text(encoding="utf-8"))
    errors = [e.message for e in jsonschema.Draft7Validator(spec).iter_errors(document)]
    assert errors == []
    document["operations"]["producers.send.notification.intents"]["action"] = "publish"
    assert list(jsonschema.Draft7Validator(spec).iter_errors(document))  # the check can fail


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_topic_is_a_channel_with_its_key_records_partitions_retention_and_roles() -> None:
    document = yaml.safe_load(generated())
    production = Topology.from_file(TOPICS, "production")
    assert set(document["channels"]) == set(production.topics)
    intents = document["channels"]["notification.intents"]
    assert intents["address"] == "{prefix}notification.intents"
    assert intents["bindings"]["kafka"]["partitions"] == 24
    assert intents["bindings"]["kafka"]["topicConfiguration"] == {
        "cleanup.policy": ["delete"],
        "retention.ms": 604800000,
    }
    assert "production 24, local 6" in intents["description"]
    message = intents["messages"]["Intent"]
    assert message["bindings"]["kafka"]["key"]["description"] == "<producer>:<idempotency_key>"
    schema = resolve(document, message["payload"]["$ref"])
    assert schema["schema"] == json.loads((REPO_ROOT / "schemas/intent.avsc").read_text())
    gateway = document["channels"]["gateway.client-events"]["messages"]["PushPayload"]
    assert "table GameTurnReady" in resolve(document, gateway["payload"]["$ref"])["description"]
    roles = {
        (op["action"], op["tags"][0]["name"])
        for op in document["operations"].values()
        if op["channel"]["$ref"] == "#/channels/notification.intents"
    }
    assert roles == {
        ("send", "producers"),
        ("send", "herald-api"),
        ("send", "operators"),
        ("receive", "herald-worker"),
    }
    for operation in document["operations"].values():
        resolve(document, operation["channel"]["$ref"])
    tiers = document["channels"]["notification.email.retry.10s"]
    assert "herald-due-at-ms" in tiers["description"]


def test_a_topic_without_its_roles_or_records_is_refused() -> None:
    doc = yaml.safe_load(TOPICS.read_text())
    del doc["topics"]["notification.status"]["readers"]
    topology = Topology.from_dict(doc, "local")
    with pytest.raises(ConfigurationError, match=r"'notification\.status' declares no readers"):
        asyncapi.document([topology], REPO_ROOT / "schemas")
    doc["topics"]["notification.status"]["readers"] = ["nobody"]
    with pytest.raises(
        ConfigurationError, match=r"roles \['nobody'\] that roles: does not declare"
    ):
        Topology.from_dict(doc, "local")
