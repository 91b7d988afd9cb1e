"""`herald bench`: Herald's throughput, latency and memory on the broker at hand.

Everything runs against the configured (usually the local) broker under a topic
prefix of its own, which is deleted afterwards, and prints figures; it asserts
nothing. docs/performance.md explains the method and keeps the figures.

- Baselines: a raw confluent-kafka consume-and-produce passthrough, and a minimal
  Faust passthrough agent configured like Herald's (acks=all, raw bytes), each moving
  the same number of ~300-byte records between two 6-partition topics.
- Push saturation: intents for users with a device and no email are published first,
  then a worker is started; the rate is intents / (first status event .. last gateway
  record), the end-to-end work of intake, enrichment, routing and push.
- Push at a fixed load: the running worker gets intents at ``rate`` per second;
  latency is gateway record time minus the moment the intent was handed to the
  producer, per intent.
- The same two for email, against an in-process SMTP sink that records when it
  accepted each mail.
- The worker's peak resident memory (VmHWM) after each run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    NewTopic,
)

from pipeline.contracts import Contracts
from pipeline.contracts import push as push_payloads
from pipeline.contracts.records import PushDevice, UserProfile
from pipeline.errors import HeraldError
from pipeline.ops.reader import read_messages, read_topic
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.topology import Topology
from pipeline.topology import admin as topology_admin

Echo = Callable[[str], None]
_HERALD = str(Path(sys.executable).with_name("herald"))
_SEQ = re.compile(r"bench-(\d+)")
_USERS = 1000


@dataclass
class Run:
    """One measured run."""

    name: str
    count: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    peak_rss_mb: float | None = None

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.rate, 1),
            "p50_ms": self.percentile(0.50),
            "p95_ms": self.percentile(0.95),
            "p99_ms": self.percentile(0.99),
            "peak_rss_mb": self.peak_rss_mb,
        }


class WorkerProcess:
    """A `herald worker` subprocess for the bench settings."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self._log = log.open("ab")
        env = {**os.environ, **settings.as_env()}
        self.proc = subprocess.Popen(
            [_HERALD, "worker"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def peak_rss_mb(self) -> float | None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(match[1]) / 1024 if match else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _settings_for(base: Settings, run: str, state: Path, **updates: Any) -> Settings:
    return base.model_copy(
        update={
            "topic_prefix": f"bench-{run}.",
            "app_id": f"herald-bench-{run}",
            "state_dir": state,
            "metrics_port": 0,
            **updates,
        }
    )


# --- baselines ---------------------------------------------------------------------


def _make_topics(settings: Settings, names: Sequence[str], partitions: int = 6) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    futures = admin.create_topics(
        [
            NewTopic(settings.topic(n), num_partitions=partitions, replication_factor=1)
            for n in names
        ]
    )
    for future in futures.values():
        future.result(timeout=30)


def _fill(settings: Settings, topic: str, count: int, size: int = 300) -> None:
    producer = Producer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 5, "acks": "all"}
    )
    payload = os.urandom(size)
    for index in range(count):
        while True:
            try:
                producer.produce(topic, key=str(index).encode(), value=payload)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(60)


def _window(settings: Settings, topic: str, count: int, timeout_s: float) -> float:
    """Seconds between the first and the last of ``count`` records on ``topic``, once
    they are all there (record timestamps: when their producer wrote them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stamps = [ts for _, _, ts, _, _ in read_topic(settings, topic)]
        if len(stamps) >= count or time.monotonic() > deadline:
            break
        time.sleep(1)
    if len(stamps) < count:
        raise HeraldError(f"only {len(stamps)} of {count} records reached {topic}")
    return (max(stamps) - min(stamps)) / 1000


def raw_passthrough(settings: Settings, count: int) -> Run:
    """confluent-kafka: consume ``count`` records and produce each to another topic
    (acks=all); timed from the first record received to the last acknowledged."""
    source, target = settings.topic("bench.raw.in"), settings.topic("bench.raw.out")
    _fill(settings, source, count)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"{settings.app_id}-raw",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    producer = Producer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "linger.ms": 5, "acks": "all"}
    )
    partitions = [TopicPartition(source, p, OFFSET_BEGINNING) for p in range(6)]
    consumer.assign(partitions)  # no group join: the loop alone is measured
    moved = 0
    started = 0.0
    try:
        while moved < count:
            for message in consumer.consume(num_messages=1000, timeout=1.0):
                if message.error():
                    continue
                started = started or time.monotonic()
                while True:
                    try:
                        producer.produce(target, key=message.key(), value=message.value())
                        break
                    except BufferError:
                        producer.poll(0.05)
                moved += 1
            producer.poll(0)
        producer.flush(60)
        seconds = time.monotonic() - started
    finally:
        consumer.close()
    return Run("raw confluent-kafka passthrough", count, seconds)


def faust_passthrough(settings: Settings, count: int, state: Path) -> Run:
    """A one-agent Faust app (Herald's Faust settings) forwarding ``count`` records."""
    source, target = settings.topic("bench.faust.in"), settings.topic("bench.faust.out")
    _fill(settings, source, count)
    env = {**os.environ, **settings.as_env()}
    with (state / "faust-passthrough.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.ops.bench_faust", source, target],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            seconds = _window(settings, target, count, 300)
        finally:
            proc.terminate()
            proc.wait(30)
    return Run("minimal Faust passthrough agent", count, seconds)


# --- the pipeline ------------------------------------------------------------------


def _users(settings: Settings, channel: str) -> None:
    with HeraldProducer(settings) as herald:
        for index in range(_USERS):
            if channel == "push":
                profile = UserProfile(
                    user_id=f"b{index}",
                    channels_disabled=["email"],
                    push_devices=[PushDevice(token=f"token-{index}")],
                )
            else:
                profile = UserProfile(user_id=f"b{index}", email=f"b{index}@bench.invalid")
            herald.put_user(profile, wait=False)


def _publish(settings: Settings, first: int, count: int, rate: float | None) -> dict[int, float]:
    """Publish intents ``first`` .. ``first+count-1``; the time each was handed over."""
    sent: dict[int, float] = {}
    started = time.monotonic()
    with HeraldProducer(settings) as herald:
        for seq in range(first, first + count):
            if rate:
                delay = started + (seq - first) / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            sent[seq] = time.time() * 1000
            herald.publish_intent(
                notification_type="game.turn.ready",
                producer="bench",
                idempotency_key=f"intent-{seq}",
                recipient_user_ids=[f"b{seq % _USERS}"],
                payload={"game_id": "g", "game_name": f"bench-{seq}", "turn_number": 1},
                wait=False,
            )
    return sent


class _Arrivals:
    """When each intent (by sequence number) was delivered."""

    def __init__(self) -> None:
        self.at_ms: dict[int, float] = {}
        self._lock = threading.Lock()

    def add(self, seq: int, at_ms: float) -> None:
        with self._lock:
            self.at_ms.setdefault(seq, at_ms)

    def count(self, seqs: Sequence[int]) -> int:
        with self._lock:
            return sum(1 for s in seqs if s in self.at_ms)


def _gateway_arrivals(settings: Settings, arrivals: _Arrivals) -> None:
    for message in read_messages(settings, settings.gateway_topic_name):
        try:
            payload = push_payloads.decode(message.value())
        except HeraldError:
            continue
        if match := _SEQ.fullmatch(str(payload.body.get("game_name", ""))):
            arrivals.add(int(match[1]), float(message.timestamp()[1]))


class _SmtpSink:
    """An in-process SMTP server recording when it accepted each bench mail."""

    def __init__(self, arrivals: _Arrivals) -> None:
        from aiosmtpd.controller import Controller

        self.arrivals = arrivals
        with socket.socket() as probe:  # aiosmtpd needs a concrete port
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        content = envelope.original_content or envelope.content
        if match := _SEQ.search(content.decode("utf-8", "replace")):
            self.arrivals.add(int(match[1]), time.time() * 1000)
        return "250 2.0.0 Ok"

    def start(self) -> int:
        self.controller.start()
        return self.port

    def stop(self) -> None:
        self.controller.stop()


def _wait(
    arrivals: _Arrivals, seqs: Sequence[int], timeout_s: float, refresh: Callable[[], None]
) -> None:
    deadline = time.monotonic() + timeout_s
    while arrivals.count(seqs) < len(seqs):
        if time.monotonic() > deadline:
            raise HeraldError(f"only {arrivals.count(seqs)} of {len(seqs)} delivered in time")
        time.sleep(1)
        refresh()


def _first_status_ms(settings: Settings, contracts: Contracts) -> float:
    return float(
        min(ts for _, _, ts, _, _ in read_topic(settings, settings.topic("notification.status")))
    )


def pipeline_runs(
    settings: Settings,
    channel: str,
    saturation: int,
    rate: float,
    duration_s: float,
    state: Path,
    echo: Echo,
) -> list[Run]:
    """Saturation and fixed-load runs of the whole pipeline to one channel."""
    contracts = Contracts(settings)
    arrivals = _Arrivals()
    sink: _SmtpSink | None = None
    if channel == "email":
        sink = _SmtpSink(arrivals)
        settings = settings.model_copy(update={"smtp_port": sink.start(), "email_provider": "smtp"})

    def refresh() -> None:
        if channel == "push":
            _gateway_arrivals(settings, arrivals)

    _users(settings, channel)
    echo(f"  {channel}: publishing {saturation} intents, then starting a worker")
    sent = _publish(settings, 0, saturation, None)
    worker = WorkerProcess(settings, state / f"worker-{channel}.log")
    runs = []
    try:
        seqs = list(range(saturation))
        _wait(arrivals, seqs, 900, refresh)
        first = _first_status_ms(settings, contracts)
        last = max(arrivals.at_ms[s] for s in seqs)
        runs.append(
            Run(
                f"{channel}: end to end at saturation",
                saturation,
                (last - first) / 1000,
                peak_rss_mb=worker.peak_rss_mb(),
            )
        )
        offered = int(rate * duration_s)
        echo(f"  {channel}: offering {offered} intents at {rate:.0f}/s")
        sent = _publish(settings, saturation, offered, rate)
        seqs = list(range(saturation, saturation + offered))
        _wait(arrivals, seqs, 900, refresh)
        runs.append(
            Run(
                f"{channel}: latency at {rate:.0f} intents/s",
                offered,
                (max(arrivals.at_ms[s] for s in seqs) - min(sent.values())) / 1000,
                latencies_ms=[arrivals.at_ms[s] - sent[s] for s in seqs],
                peak_rss_mb=worker.peak_rss_mb(),
            )
        )
    finally:
        worker.stop()
        if sink is not None:
            sink.stop()
    return runs


def run_bench(
    base: Settings,
    *,
    intents: int,
    rate: float,
    duration_s: float,
    email_intents: int,
    baselines: bool,
    echo: Echo,
) -> list[Run]:
    """Every run, printed as it finishes; topics deleted at the end."""
    run_id = uuid.uuid4().hex[:8]
    state = base.state_dir / "bench" / run_id
    state.mkdir(parents=True, exist_ok=True)
    settings = _settings_for(base, run_id, state)
    topology_admin.apply(settings, Topology.load(settings))
    runs: list[Run] = []

    def done(run: Run) -> None:
        runs.append(run)
        echo(_line(run))

    try:
        if baselines:
            _make_topics(
                settings, ["bench.raw.in", "bench.raw.out", "bench.faust.in", "bench.faust.out"]
            )
            echo("baselines")
            done(raw_passthrough(settings, intents))
            done(faust_passthrough(settings, intents, state))
        echo("pipeline")
        for run in pipeline_runs(settings, "push", intents, rate, duration_s, state, echo):
            done(run)
        if email_intents:
            mail = _settings_for(base, f"{run_id}m", state)
            topology_admin.apply(mail, Topology.load(mail))
            try:
                email_runs = pipeline_runs(
                    mail, "email", email_intents, rate, duration_s, state, echo
                )
            finally:
                topology_admin.delete_prefixed(mail)
            for run in email_runs:
                done(run)
    finally:
        topology_admin.delete_prefixed(settings)
    _ratios(runs, echo)
    (state / "figures.json").write_text(json.dumps([r.as_dict() for r in runs], indent=2))
    echo(f"figures: {state / 'figures.json'}")
    return runs


def _line(run: Run) -> str:
    latency = ""
    if run.latencies_ms:
        p50, p95, p99 = (run.percentile(q) for q in (0.5, 0.95, 0.99))
        latency = f"  P50 {p50:.0f} ms  P95 {p95:.0f} ms  P99 {p99:.0f} ms"
    memory = f"  peak RSS {run.peak_rss_mb:.0f} MiB" if run.peak_rss_mb else ""
    figures = f"{run.count:7d} in {run.seconds:6.1f}s = {run.rate:8.0f}/s"
    return f"  {run.name:38} {figures}{latency}{memory}"


def _ratios(runs: list[Run], echo: Echo) -> None:
    by_name = {run.name: run for run in runs}
    push = by_name.get("push: end to end at saturation")
    for baseline in ("raw confluent-kafka passthrough", "minimal Faust passthrough agent"):
        if push and baseline in by_name and by_name[baseline].rate:
            echo(f"  push pipeline / {baseline}: {push.rate / by_name[baseline].rate:.1%}")
