"""Test helpers that drive real processes and read real topics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import yaml

from pipeline.agents.watchdog import EXIT_STALLED
from pipeline.contracts import Contracts, RecordCodec
from pipeline.contracts.ids import deterministic_id
from pipeline.contracts.records import ChannelRequest
from pipeline.ops.reader import read_topic
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.topology import Topology
from pipeline.topology import admin as topology_admin

R = TypeVar("R")

HERALD = str(Path(sys.executable).with_name("herald"))


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see ``settings``."""
    return {**os.environ, **settings.as_env()}


class WorkerProcess:
    """One `herald worker` subprocess, its output in a log file, supervised like in
    production: a worker that exits with EXIT_STALLED is started again."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._supervising = False
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self._spawn()
        self._supervising = True
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)
        self._supervisor.start()

    def _spawn(self) -> None:
        self._proc = subprocess.Popen(
            [HERALD, "worker"],
            env=settings_env(self.settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def _supervise(self) -> None:
        while self._supervising:
            proc = self._proc
            if proc is not None and proc.poll() == EXIT_STALLED and self._supervising:
                self.restarts += 1
                self._spawn()
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit (and no restart)."""
        self._supervising = False
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait(30)
        self._close_log()

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL after 30 s."""
        self._supervising = False
        if self._supervisor is not None:
            self._supervisor.join(5)
        if self._proc is None or self._proc.poll() is not None:
            self._close_log()
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        self._close_log()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


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
