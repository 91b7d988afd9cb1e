"""Test helpers that drive real processes and read real topics."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import IO, Any, TypeVar

import yaml
from confluent_kafka import Consumer, TopicPartition

from pipeline.contracts import Contracts, RecordCodec
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.push import decode
from pipeline.contracts.records import ChannelRequest, PushDevice, StatusEvent, UserProfile
from pipeline.errors import BrokerUnavailableError
from pipeline.ops.reader import read_messages, read_topic
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.topology import Topology
from pipeline.topology import admin as topology_admin
from tests.smtp import ScriptedSmtp

R = TypeVar("R")

HERALD = str(Path(sys.executable).with_name("herald"))


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see ``settings``."""
    return {**os.environ, **settings.as_env()}


class WorkerProcess:
    """One `herald worker` subprocess, its output in a log file.

    Nothing restarts it: a worker that exits on its own (the stall watchdog's
    exit status 75, a crash) stays down, and the test that started it fails at teardown
    with the exit status and the log's tail (tests/conftest.py), so no restart is ever
    hidden from a test's assertions."""

    #: Every worker started, for the teardown check of unexpected exits.
    started: list[WorkerProcess] = []

    def __init__(
        self, settings: Settings, log_path: Path, command: Sequence[str] = (HERALD, "worker")
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.command = list(command)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._ending = False

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self.command,
            env=settings_env(self.settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        WorkerProcess.started.append(self)

    def unexpected_exit(self) -> int | None:
        """The exit status of a worker that ended without kill() or stop()."""
        if self._ending or self._proc is None:
            return None
        return self._proc.poll()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit."""
        self._ending = True
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait(30)
        self._close_log()

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL after 30 s."""
        if self._proc is not None and self._proc.poll() is None:
            self._ending = True
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._close_log()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass(frozen=True)
class Life:
    """One worker's life in a kill test (time.monotonic())."""

    started: float
    killed: float
    delivered: int
    """What the provider accepted while it lived."""


def kill_mid_send(
    settings: Settings,
    folder: Path,
    kills: int,
    delivered: Callable[[], int],
    rng: random.Random,
) -> list[Life]:
    """Start a worker ``kills`` times, each SIGKILLed (and the next started at once)
    0.2-1.5 s after the provider accepted its first delivery (``delivered()`` counts
    them): every kill strikes mid-send."""
    lives = []
    for life in range(kills):
        worker = WorkerProcess(settings, folder / f"worker{life}.log")
        before = delivered()
        started = time.monotonic()
        worker.start()
        deadline = started + 60
        while delivered() == before and time.monotonic() < deadline:
            assert worker.alive(), f"worker {life} exited: {worker.log()[-2000:]}"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.2, 1.5))
        worker.kill()
        lives.append(Life(started, time.monotonic(), delivered() - before))
    return lives


def wait_for(
    settings: Settings,
    logical_topic: str,
    codec: RecordCodec[Any],
    done: Callable[[list[Any]], bool],
    *,
    timeout_s: float = 60.0,
    what: str = "records",
) -> list[Any]:
    """Read ``logical_topic`` until ``done(records)`` holds; AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    records: list[Any] = []
    while True:
        records = [
            codec.decode(value) for *_, value in read_topic(settings, settings.topic(logical_topic))
        ]
        if done(records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what} on {logical_topic}: have {len(records)}"
            )
        time.sleep(0.5)


def read_all(settings: Settings, logical_topic: str, codec: RecordCodec[Any]) -> list[Any]:
    """Everything on a topic right now, decoded."""
    return [
        codec.decode(value) for *_, value in read_topic(settings, settings.topic(logical_topic))
    ]


def fast_retries(settings: Settings, folder: Path, stage: str, **updates: Any) -> Settings:
    """``settings`` with a copy of topologies/ in ``folder`` whose ``stage`` retries
    wait 1 s, then 2 s, for 3 attempts (the tier topics created), plus ``updates``."""
    folder.mkdir()
    shutil.copy(settings.topology_dir / "catalog.yaml", folder / "catalog.yaml")
    doc = yaml.safe_load((settings.topology_dir / "topics.yaml").read_text())
    doc["retry"][stage] = {"budget": 3, "tiers": ["1s", "2s"]}
    (folder / "topics.yaml").write_text(yaml.safe_dump(doc))
    fast = settings.model_copy(update={"topology_dir": folder, **updates})
    assert not topology_admin.apply(fast, Topology.load(fast)).drift
    return fast


def with_types(
    settings: Settings,
    folder: Path,
    types: dict[str, dict[str, Any]],
    templates: dict[str, dict[str, str]],
    **updates: Any,
) -> Settings:
    """``settings`` whose catalog (copied into ``folder``) has ``types`` besides its own,
    and whose templates (copied too) have ``templates``: type -> part -> en text."""
    topologies, template_dir = folder / "catalog", folder / "templates"
    shutil.copytree(settings.topology_dir, topologies)
    shutil.copytree(settings.templates_dir, template_dir)
    doc = yaml.safe_load((topologies / "catalog.yaml").read_text())
    doc["types"].update(types)
    (topologies / "catalog.yaml").write_text(yaml.safe_dump(doc))
    for name, parts in templates.items():
        (template_dir / name / "en").mkdir(parents=True, exist_ok=True)
        for part, text in parts.items():
            (template_dir / name / "en" / f"{part}.j2").write_text(text)
    return settings.model_copy(
        update={"topology_dir": topologies, "templates_dir": template_dir, **updates}
    )


TURN = {"game_id": "g-1", "game_name": "Andromeda", "turn_number": 4}


def route(user: str, address: str, **fields: Any) -> ChannelRequest:
    """A template-mode route as the router writes it."""
    notification_id = fields.pop("notification_id", deterministic_id("test", user, address))
    values: dict[str, Any] = {
        "route_id": deterministic_id(notification_id, "email", user),
        "notification_id": notification_id,
        "notification_type": "game.turn.ready",
        "channel": "email",
        "template_id": "game.turn.ready",
        "user_id": user,
        "address": address,
        "variables_json": json.dumps(TURN),
    }
    values.update(fields)
    return ChannelRequest(**values)


def publish_routes(settings: Settings, contracts: Contracts, routes: list[ChannelRequest]) -> None:
    with HeraldProducer(settings, contracts) as herald:
        for request in routes:
            herald._produce(  # the router's output, written the way the router keys it
                settings.topic("notification.email.requested"),
                (request.user_id or "").encode(),
                contracts.channel_request.encode(request),
                wait=False,
            )


def owner_of_connection(local_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the TCP socket bound to ``local_port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == local_port:
                    inodes.add(fields[9])
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        if any(link == f"socket:[{inode}]" for link in links for inode in inodes):
            return pid
    return None


USERS = 30


def publish(settings: Settings, count: int, rate_per_s: float | None = None) -> list[str]:
    """``count`` intents (game.turn.ready, one recipient each); their game ids."""
    run = uuid.uuid4().hex[:6]
    ids = []
    with HeraldProducer(settings) as herald:
        for user in range(USERS):
            herald.put_user(
                UserProfile(
                    user_id=f"s{user}",
                    email=f"s{user}@example.org",
                    push_devices=[PushDevice(token=f"phone-{user}", platform="android")],
                )
            )
        for index in range(count):
            for _ in range(10):  # as a producer service would: the same key again
                try:
                    herald.publish_intent(
                        notification_type="game.turn.ready",
                        producer="scale-test",
                        idempotency_key=f"{run}-{index}",
                        recipient_user_ids=[f"s{index % USERS}"],
                        payload={
                            "game_id": f"g{index}",
                            "game_name": "Andromeda",
                            "turn_number": index,
                        },
                    )
                    break
                except BrokerUnavailableError:
                    continue  # the broker is away (the restart drill): retry the intent
            ids.append(f"g{index}")
            if rate_per_s:
                time.sleep(1 / rate_per_s)
    return ids


def gateway_games(settings: Settings) -> Counter[str]:
    """Pushes on the gateway topic per game id (read back from the FlatBuffers body)."""
    games: Counter[str] = Counter()
    for message in read_messages(settings, settings.gateway_topic_name):
        payload = decode(message.value() or b"")
        games[str(payload.body["game_id"])] += 1
    return games


def game_of(mail: EmailMessage) -> str:
    body = mail.get_body(("plain",))
    match = re.search(r"Game ID: (g\d+)", str(body.get_content()) if body else "")
    return match.group(1) if match else "?"


def wait_for_deliveries(
    settings: Settings, smtp: ScriptedSmtp, ids: list[str]
) -> tuple[Counter[str], Counter[str]]:
    """Once every intent has its mail and its push, and a little longer (a duplicate
    would arrive then): mails and pushes per game id."""
    smtp.wait_for(len(ids), timeout_s=240)
    contracts = Contracts(settings)
    try:
        wait_for(
            settings,
            "notification.status",
            contracts.status,
            lambda evs: (
                len({e.route_id for e in evs if e.status in ("sent", "published")}) >= 2 * len(ids)
            ),
            timeout_s=240,
            what="a sent mail and a published push per intent",
        )
    except AssertionError as timeout:
        events = read_all(settings, "notification.status", contracts.status)
        raise AssertionError(f"{timeout}\n{unfinished(events)}\n{behind(settings)}") from None
    time.sleep(3)
    mails = Counter(game_of(m) for _, m in smtp.received)
    return mails, gateway_games(settings)


def behind(settings: Settings) -> str:
    """What a timed-out wait also explains itself with: the partitions of the run's topics
    whose group commit is short of their end (records not handled yet: a stall), or
    "none" (every record was committed: one that left no trace was lost)."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": settings.app_id}
    )
    try:
        topics = [
            t for t in consumer.list_topics(timeout=10).topics if t.startswith(settings.topic(""))
        ]
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ]
        commits = consumer.committed(partitions, timeout=10)
        # A topic with no commit at all is one the group does not read (status, gateway).
        read = {c.topic for c in commits if c.offset >= 0}
        short = []
        for committed in commits:
            end = consumer.get_watermark_offsets(committed, timeout=10)[1]
            if committed.topic in read and end and committed.offset < end:
                short.append(f"{committed.topic}[{committed.partition}] {committed.offset}/{end}")
        return f"group commits short of the end: {sorted(short) or 'none'}"
    finally:
        consumer.close()


def unfinished(events: list[StatusEvent]) -> str:
    """What a timed-out delivery wait explains itself with: the routes without a
    ``sent``/``published`` event and their histories, and notifications never routed."""
    routes: dict[str, list[str]] = {}
    routed: set[str] = set()
    notifications: set[str] = set()
    for event in events:
        if event.notification_id:
            notifications.add(event.notification_id)
        if event.route_id:
            routes.setdefault(event.route_id, []).append(f"{event.channel}:{event.status}")
            routed.add(event.notification_id or "?")
    open_routes = {
        route: history
        for route, history in routes.items()
        if not any(step.endswith((":sent", ":published")) for step in history)
    }
    return (
        f"{len(notifications)} notifications, {len(routes)} routes; "
        f"never routed: {sorted(notifications - routed)[:20]}; "
        f"unfinished routes ({len(open_routes)}): {dict(list(open_routes.items())[:20])}"
    )
