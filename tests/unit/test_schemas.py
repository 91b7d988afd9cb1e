"""The schema compatibility gate (pipeline.contracts.evolution): the repository's
contracts pass it; breaking changes, unpublished changes and edits of published
versions fail it; `herald schemas pin` publishes a compatible change; `herald schemas
register` sets compatibility and registers every version over the registry's REST API."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.contracts import Contracts
from pipeline.contracts.evolution import History, check, pin, register
from pipeline.errors import ConfigurationError
from pipeline.ops.cli import cli
from pipeline.settings import REPO_ROOT, Settings

SCHEMAS = REPO_ROOT / "schemas"


@pytest.fixture
def schemas(tmp_path: Path) -> Path:
    """A copy of the repository's schemas folder to break."""
    return Path(shutil.copytree(SCHEMAS, tmp_path / "schemas"))


def edit_avsc(folder: Path, name: str, change: Any) -> None:
    schema = json.loads((folder / name).read_text())
    change(schema["fields"])
    (folder / name).write_text(json.dumps(schema, indent=2))


def test_the_repositorys_contracts_pass_the_gate() -> None:
    assert check(SCHEMAS) == []
    result = CliRunner().invoke(cli, ["schemas", "check"])
    assert result.exit_code == 0, result.output
    assert "every current schema conforms" in result.output


def test_a_field_added_without_a_default_breaks_backward(schemas: Path) -> None:
    edit_avsc(schemas, "intent.avsc", lambda f: f.append({"name": "region", "type": "string"}))
    problems = check(schemas)
    assert any(
        "breaks FULL_TRANSITIVE for herald.Intent: it cannot read data written with v1" in p
        and "reader_field_missing_default_value" in p
        for p in problems
    ), problems


def test_a_field_removed_without_a_default_breaks_forward(schemas: Path) -> None:
    edit_avsc(schemas, "recipient.avsc", lambda f: f.pop([x["name"] for x in f].index("producer")))
    problems = check(schemas)
    assert any("v1 readers cannot read what it writes" in p for p in problems), problems


def test_a_retyped_field_breaks_both_ways_and_every_earlier_version_counts(
    schemas: Path,
) -> None:
    """ChannelRequest has two versions: a change is held against both (transitive)."""

    def retype(fields: list[dict[str, Any]]) -> None:
        (field,) = [f for f in fields if f["name"] == "route_id"]
        field["type"] = "long"

    edit_avsc(schemas, "channel_request.avsc", retype)
    problems = check(schemas)
    for version in ("v1", "v2"):
        assert any(f"written with {version} (type_mismatch" in p for p in problems), problems
        assert any(f"{version} readers cannot read" in p for p in problems), problems


def test_a_compatible_change_must_be_published_and_pin_publishes_it(schemas: Path) -> None:
    edit_avsc(
        schemas,
        "intent.avsc",
        lambda f: f.append({"name": "region", "type": ["null", "string"], "default": None}),
    )
    (problems,) = check(schemas)
    assert "intent.avsc differs from herald.Intent v1" in problems
    assert "`herald schemas pin` publishes it as v2" in problems
    next_id = max(v.schema_id or 0 for v in History.load(schemas).avro) + 1
    (pinned,) = pin(schemas)
    assert (pinned.subject, pinned.version, pinned.schema_id) == ("herald.Intent", 2, next_id)
    assert check(schemas) == []
    # The embedded registry now knows the new version under its own id, and v1 under 1.
    contracts = Contracts(Settings(schemas_dir=schemas))
    assert contracts.intent.avro.schema_id == next_id
    assert contracts.registry.schema_by_id(1) == json.loads(
        (schemas / "history/herald.Intent/v1.avsc").read_text()
    )


def test_pin_refuses_a_breaking_change_and_publishes_nothing(schemas: Path) -> None:
    before = (schemas / "registry.json").read_text()
    edit_avsc(schemas, "intent.avsc", lambda f: f.append({"name": "region", "type": "string"}))
    with pytest.raises(ConfigurationError, match="reader_field_missing_default_value"):
        pin(schemas)
    assert (schemas / "registry.json").read_text() == before
    assert not (schemas / "history/herald.Intent/v2.avsc").exists()


def test_a_published_version_edited_in_place_fails(schemas: Path) -> None:
    """The defect the gate was built after: DeadLetter's id 8 had its schema changed in
    place (so records written before could no longer be read by id)."""
    path = schemas / "history/herald.DeadLetter/v2.avsc"
    path.write_text(path.read_text().replace("A route Herald gave up on", "A route"))
    problems = check(schemas)
    assert any(
        "history/herald.DeadLetter/v2.avsc changed after it was published" in p for p in problems
    ), problems


def test_the_compatibility_level_is_per_subject(schemas: Path) -> None:
    """BACKWARD allows a field removed (old readers are not asked) but not one added
    without a default."""
    index = json.loads((schemas / "registry.json").read_text())
    index["compatibility"]["herald.Recipient"] = "BACKWARD"
    (schemas / "registry.json").write_text(json.dumps(index))
    edit_avsc(schemas, "recipient.avsc", lambda f: f.pop([x["name"] for x in f].index("producer")))
    assert [p for p in check(schemas) if "breaks" in p] == []
    edit_avsc(schemas, "recipient.avsc", lambda f: f.append({"name": "x", "type": "string"}))
    assert any("breaks BACKWARD for herald.Recipient" in p for p in check(schemas))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (("  turn_number: uint32;", "  turn_number: string;"), "types differ"),
        (("  turn_number: uint32;\n", ""), "field deleted"),
        (
            ("  game_id: string;\n", "  game_id: string;\n  added: string;\n"),
            "offsets differ",
        ),
    ],
)
def test_flatbuffers_fields_are_only_appended(
    schemas: Path, change: tuple[str, str], why: str
) -> None:
    fbs = schemas / "notification.fbs"
    text = fbs.read_text()
    assert change[0] in text
    fbs.write_text(text.replace(change[0], change[1], 1))
    problems = check(schemas)
    assert any("notification.fbs does not conform to v1" in p and why in p for p in problems)


def test_a_flatbuffers_field_appended_conforms_once_pinned(schemas: Path) -> None:
    fbs = schemas / "notification.fbs"
    fbs.write_text(
        fbs.read_text().replace(
            "  turn_number: uint32;", "  turn_number: uint32;\n  round: uint32;", 1
        )
    )
    (problem,) = check(schemas)
    assert "notification.fbs differs from v1" in problem
    (pinned,) = pin(schemas)
    assert pinned.file == "history/notification/v2.fbs"
    assert check(schemas) == []


class Registry(BaseHTTPRequestHandler):
    """The two calls of a Confluent registry's REST API `register` makes, over HTTP:
    PUT /config/<subject> and POST /subjects/<subject>/versions."""

    calls: list[tuple[str, str, dict[str, Any]]] = []
    ids: dict[str, int] = {}

    def _answer(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        return body

    def do_PUT(self) -> None:
        body = self._body()
        self.calls.append(("PUT", self.path, body))
        self._answer(body)

    def do_POST(self) -> None:
        body = self._body()
        self.calls.append(("POST", self.path.split("?")[0], body))
        schema_id = self.ids.setdefault(body["schema"], 100 + len(self.ids))
        self._answer({"id": schema_id})

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def registry_url() -> Iterator[str]:
    Registry.calls, Registry.ids = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_register_sets_each_subjects_compatibility_then_its_versions_in_order(
    registry_url: str,
) -> None:
    done = register(SCHEMAS, registry_url)
    history = History.load(SCHEMAS)
    assert [(d.subject, d.version) for d in done] == [
        (v.subject, v.version)
        for v in sorted(history.avro, key=lambda v: history.subjects().index(v.subject))
    ]
    puts = [(path, body) for method, path, body in Registry.calls if method == "PUT"]
    assert puts == [
        (f"/config/{s}", {"compatibility": "FULL_TRANSITIVE"}) for s in history.subjects()
    ]
    posts = [
        (path, json.loads(body["schema"])["name"])
        for m, path, body in Registry.calls
        if m == "POST"
    ]
    assert posts[:2] == [
        ("/subjects/herald.Intent/versions", "Intent"),
        ("/subjects/herald.Recipient/versions", "Recipient"),
    ]
    # Each subject's PUT comes before its versions.
    order = [(m, path.split("/")[2]) for m, path, _ in Registry.calls]
    for subject in history.subjects():
        assert order.index(("PUT", subject)) < order.index(("POST", subject))
    result = CliRunner().invoke(
        cli, ["schemas", "register"], env={"SCHEMA_REGISTRY_URL": registry_url}
    )
    assert result.exit_code == 0, result.output
    assert any(
        line.split()[:2] == ["herald.DeadLetter", "v2"] for line in result.output.splitlines()
    ), result.output
