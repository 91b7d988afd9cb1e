"""Template versions: a template's version follows its content, the archive keeps
every version's files and renders an archived one as it was, and a route renders the
version it names (a resend of what the original rendered) or the deployed one."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pipeline.contracts.records import ChannelRequest
from pipeline.errors import RenderError, TemplateArchiveLoadingError
from pipeline.rendering import TemplateCatalog
from pipeline.settings import REPO_ROOT, Settings
from pipeline.views import TemplateArchive
from tests.unit.helpers import stage_context

TURN = {"game_id": "g-1", "game_name": "Andromeda", "turn_number": 7}


@pytest.fixture
def templates_dir(tmp_path: Path) -> Path:
    return Path(shutil.copytree(REPO_ROOT / "templates", tmp_path / "templates"))


def change_subject(templates_dir: Path) -> None:
    subject = templates_dir / "game.turn.ready" / "en" / "subject.j2"
    subject.write_text("NEW " + subject.read_text())


def test_a_templates_version_follows_its_files_only(templates_dir: Path) -> None:
    before = TemplateCatalog(templates_dir)
    assert before.version("game.turn.ready") == TemplateCatalog(templates_dir).version(
        "game.turn.ready"
    )
    change_subject(templates_dir)
    after = TemplateCatalog(templates_dir)
    assert after.version("game.turn.ready") != before.version("game.turn.ready")
    assert after.version("game.finished") == before.version("game.finished")
    assert after.version("no.such.type") is None
    assert len(before.version("game.turn.ready") or "") == 12


def test_an_archived_version_renders_as_it_was(templates_dir: Path) -> None:
    before = TemplateCatalog(templates_dir)
    change_subject(templates_dir)
    after = TemplateCatalog(templates_dir)
    archived = TemplateCatalog.of_files("game.turn.ready", before.files("game.turn.ready"))
    assert archived.version("game.turn.ready") == before.version("game.turn.ready")
    old = before.render_mail("game.turn.ready", "de", TURN)
    assert archived.render_mail("game.turn.ready", "de", TURN) == old
    assert after.render_mail("game.turn.ready", "en", TURN).subject.startswith("NEW ")
    assert not archived.render_mail("game.turn.ready", "en", TURN).subject.startswith("NEW ")


def test_the_archive_records_each_version_once_and_knows_what_it_lacks(
    settings: Settings, templates_dir: Path
) -> None:
    archive = TemplateArchive(settings)
    before = TemplateCatalog(templates_dir)
    records = archive.entries(before, 1_000)
    assert len(records) == len(before.template_ids())
    (turn,) = [
        r
        for r in records
        if r.key == f"game.turn.ready@{before.version('game.turn.ready')}".encode()
    ]
    assert json.loads(turn.value or b"")["files"] == before.files("game.turn.ready")
    assert archive.entries(before, 2_000) == []  # nothing new
    change_subject(templates_dir)
    after = TemplateCatalog(templates_dir)
    (new,) = archive.entries(after, 3_000)
    assert new.key == f"game.turn.ready@{after.version('game.turn.ready')}".encode()
    with pytest.raises(RenderError, match="not in the template archive") as refused:
        archive.catalog("game.turn.ready", "0123456789ab")
    assert refused.value.reason == "template_version_unknown"
    archive.ready.clear()  # a worker's archive still loading: try again later
    with pytest.raises(TemplateArchiveLoadingError):
        archive.catalog("game.turn.ready", "0123456789ab")


def test_a_route_renders_the_version_it_names_or_the_deployed_one(
    settings: Settings, templates_dir: Path
) -> None:
    old = stage_context(settings.model_copy(update={"templates_dir": templates_dir}))
    old.template_archive.entries(old.templates, 1_000)
    change_subject(templates_dir)
    ctx = stage_context(settings.model_copy(update={"templates_dir": templates_dir}))
    # The worker's archive holds what an earlier worker archived (here: copied over).
    ctx.template_archive.items.update(old.template_archive.items)
    recorded = old.templates.version("game.turn.ready")
    deployed = ctx.templates.version("game.turn.ready")
    assert recorded != deployed
    assert ctx.templates_for("game.turn.ready", None) is ctx.templates
    assert ctx.templates_for("game.turn.ready", deployed) is ctx.templates
    subject = (
        ctx.templates_for("game.turn.ready", recorded)
        .render_mail("game.turn.ready", "en", TURN)
        .subject
    )
    assert not subject.startswith("NEW ")
    request = ChannelRequest(
        route_id="r",
        notification_id="n",
        notification_type="game.turn.ready",
        channel="email",
        template_id="game.turn.ready",
        address="a@example.org",
        occurred_at_ms=0,
        produced_at_ms=0,
    )
    assert ctx.template_version(request) == deployed
    assert ctx.template_version(dataclasses.replace(request, template_version=recorded)) == recorded
    assert ctx.template_version(dataclasses.replace(request, payload_mode="rendered")) is None
