"""`herald bench`: Herald's throughput, latency and memory on the broker at hand.

Everything runs against the configured (usually the local) broker under a topic
prefix of its own, which is deleted afterwards, and prints figures; it asserts
nothing. docs/performance.md explains the method and keeps the figures.

- Baselines: a raw confluent-kafka consume-and-produce passthrough, and a minimal
  Faust passthrough agent configured like Herald's (acks=all, raw bytes), each moving
  the same number of ~300-byte records between two 6-partition topics.
- Saturation, backlog drain: intents for users with a device and no email are
  published first, then the workers (``--workers``, push only) are started; the rate
  is intents / (first status event .. last gateway record), intake, enrichment,
  routing and push working off a backlog stage after stage.
- Saturation, pipelined: once the workers' group is stable and they have drained the
  backlog, as many intents again are offered as fast as the producer takes them; the
  rate is intents / (first intent handed to the producer .. last delivered), the
  stages overlapping as they do in production.
- Latency at a fixed load: the running workers get intents at ``rate`` per second;
  latency is gateway record time minus the moment the intent was handed to the
  producer, per intent.
- The same three for email (always one worker), against an in-process SMTP sink that
  records when it accepted each mail.
- The workers' peak resident memory (VmHWM, summed over the workers) after each run.
- Each pipeline rate also as a share of the two baselines of the same bench run.

One producer per channel publishes every intent; it is connected and holds its
idempotence PID before anything is timed. Push deliveries are seen by one consumer
following the gateway topic on a thread of its own.
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

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupState,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    NewTopic,
)

from pipeline.contracts import Contracts
from pipeline.contracts import push as push_payloads
from pipeline.contracts.records import PushDevice, UserProfile
from pipeline.errors import HeraldError
from pipeline.ops.reader import read_topic
from pipeline.producer import HeraldProducer
from pipeline.settings import Settings
from pipeline.topology import Topology
from pipeline.topology import admin as topology_admin

Echo = Callable[[str], None]
_HERALD = str(Path(sys.executable).with_name("herald"))
_SEQ = re.compile(r"bench-(\d+)")
_USERS = 1000
_RAW = "raw confluent-kafka passthrough"
_FAUST = "minimal Faust passthrough agent"


@dataclass
class Run:
    """One measured run."""

    name: str
    count: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    peak_rss_each_mb: list[float] = field(default_factory=list)
    """Each worker's peak RSS (one entry per worker process)."""

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def peak_rss_mb(self) -> float | None:
        """The workers' peak RSS, summed."""
        return sum(self.peak_rss_each_mb) if self.peak_rss_each_mb else None

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
            "peak_rss_each_mb": self.peak_rss_each_mb or None,
        }


class WorkerProcess:
    """A `herald worker` (or another ``command``) subprocess for the bench settings."""

    def __init__(self, settings: Settings, log: Path, command: str = "worker") -> None:
        self._log = log.open("ab")
        env = {**os.environ, **settings.as_env()}
        self.proc = subprocess.Popen(
            [_HERALD, command], env=env, stdout=self._log, stderr=subprocess.STDOUT
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


class Workers:
    """``count`` `herald worker` processes in one consumer group, each with a state
    directory of its own (their local table stores must not be shared)."""

    def __init__(self, settings: Settings, count: int, state: Path, name: str) -> None:
        self.settings = settings
        self.procs: list[WorkerProcess] = []
        try:
            for index in range(count):
                own = settings.model_copy(update={"state_dir": state / f"worker-{index}"})
                self.procs.append(WorkerProcess(own, state / f"worker-{name}-{index}.log"))
        except BaseException:
            self.stop()
            raise

    def peak_rss_each_mb(self) -> list[float]:
        return [rss for rss in (w.peak_rss_mb() for w in self.procs) if rss is not None]

    def await_stable(self, timeout_s: float = 180) -> None:
        """Until the group is stable with every worker in it: a rebalance inside a
        timed run would measure the join, not the pipeline."""
        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap_servers})
        group = self.settings.app_id  # Faust's consumer group is its app id
        deadline = time.monotonic() + timeout_s
        seen = "not described"
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.proc.poll() is not None:
                    raise HeraldError(f"a worker exited with {proc.proc.returncode}")
            try:
                found = admin.describe_consumer_groups([group])[group].result(timeout=15)
            except KafkaException as exc:
                seen = str(exc)
            else:
                seen = f"{found.state.name}, {len(found.members)} member(s)"
                if found.state == ConsumerGroupState.STABLE and len(found.members) == len(
                    self.procs
                ):
                    return
            time.sleep(0.5)
        raise HeraldError(f"group {group} not stable with {len(self.procs)} workers: {seen}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


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


class _Follower:
    """One consumer following a whole topic from its beginning on a thread of its own,
    handing each record to ``on_message``: re-reading the topic to see what arrived
    would cost the bench process (and so the workers beside it) more as the topic
    grows."""

    def __init__(
        self, settings: Settings, topic: str, on_message: Callable[[Message], None]
    ) -> None:
        self._on_message = on_message
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "group.id": f"{settings.app_id}-bench-follower",  # never joined
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )
        try:
            meta = self._consumer.list_topics(topic, timeout=15).topics.get(topic)
            if meta is None or meta.error is not None:
                raise HeraldError(f"cannot follow {topic}: {meta.error if meta else 'missing'}")
            self._consumer.assign(
                [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
            )
        except BaseException:
            self._consumer.close()
            raise
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._follow, name=f"follow {topic}", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        try:
            while not self._stop.is_set():
                for message in self._consumer.consume(num_messages=1000, timeout=0.2):
                    if not message.error():
                        self._on_message(message)
        except BaseException as exc:  # shown by whoever waits on this follower
            self.failure = exc
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


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
    stamps: list[int] = []
    follower = _Follower(settings, topic, lambda m: stamps.append(m.timestamp()[1]))
    try:
        deadline = time.monotonic() + timeout_s
        while len(stamps) < count and time.monotonic() < deadline and not follower.failure:
            time.sleep(0.1)
    finally:
        follower.stop()
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
    return Run(_RAW, count, seconds)


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
    return Run(_FAUST, count, seconds)


# --- the pipeline ------------------------------------------------------------------


class _BenchProducer(HeraldProducer):
    """The one producer of a channel's runs."""

    def warm(self) -> None:
        """Have the connection, the idempotence PID and the intents topic's metadata
        before anything is timed: the first timed intents would pay for them."""
        self._producer.list_topics(self._intents_topic, timeout=15)
        self.flush()  # at least one acknowledged record (the users): PID acquired


def _users(herald: HeraldProducer, channel: str) -> None:
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


def _publish(
    herald: HeraldProducer, first: int, count: int, rate: float | None
) -> dict[int, float]:
    """Publish intents ``first`` .. ``first+count-1`` (at ``rate`` per second, or as fast
    as the producer takes them); the time each was handed over."""
    sent: dict[int, float] = {}
    started = time.monotonic()
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
    herald.flush(60)
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


def _follow_gateway(settings: Settings, arrivals: _Arrivals) -> _Follower:
    """Record each bench push as it reaches the gateway topic (its record time)."""

    def arrived(message: Message) -> None:
        try:
            payload = push_payloads.decode(message.value())
        except HeraldError:
            return
        if match := _SEQ.fullmatch(str(payload.body.get("game_name", ""))):
            arrivals.add(int(match[1]), float(message.timestamp()[1]))

    return _Follower(settings, settings.gateway_topic_name, arrived)


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
    arrivals: _Arrivals, seqs: Sequence[int], timeout_s: float, follower: _Follower | None
) -> None:
    deadline = time.monotonic() + timeout_s
    while arrivals.count(seqs) < len(seqs):
        if follower is not None and follower.failure is not None:
            raise HeraldError(f"following the gateway topic failed: {follower.failure}")
        if time.monotonic() > deadline:
            raise HeraldError(f"only {arrivals.count(seqs)} of {len(seqs)} delivered in time")
        time.sleep(0.1)


def _first_status_ms(settings: Settings, contracts: Contracts) -> float:
    return float(
        min(ts for _, _, ts, _, _ in read_topic(settings, settings.topic("notification.status")))
    )


def _label(channel: str, workers: int) -> str:
    return f"{channel}, {workers} worker{'s' if workers > 1 else ''}"


def pipeline_runs(
    settings: Settings,
    channel: str,
    saturation: int,
    rate: float,
    duration_s: float,
    state: Path,
    echo: Echo,
    workers: int = 1,
) -> list[Run]:
    """Backlog-drain, pipelined and fixed-load runs of the whole pipeline to one
    channel, with ``workers`` worker processes."""
    contracts = Contracts(settings)
    arrivals = _Arrivals()
    label = _label(channel, workers)
    sink: _SmtpSink | None = None
    follower: _Follower | None = None
    group: Workers | None = None
    runs: list[Run] = []
    try:
        if channel == "email":
            sink = _SmtpSink(arrivals)
            settings = settings.model_copy(
                update={"smtp_port": sink.start(), "email_provider": "smtp"}
            )
        else:
            follower = _follow_gateway(settings, arrivals)
        with _BenchProducer(settings) as herald:
            _users(herald, channel)
            herald.warm()

            echo(f"  {label}: publishing {saturation} intents, then starting the workers")
            _publish(herald, 0, saturation, None)
            group = Workers(settings, workers, state, channel)
            seqs = list(range(saturation))
            _wait(arrivals, seqs, 900, follower)
            first = _first_status_ms(settings, contracts)
            runs.append(
                Run(
                    f"{label}: saturation, backlog drain",
                    saturation,
                    (max(arrivals.at_ms[s] for s in seqs) - first) / 1000,
                    peak_rss_each_mb=group.peak_rss_each_mb(),
                )
            )

            group.await_stable()
            echo(f"  {label}: offering {saturation} intents as fast as the producer takes them")
            sent = _publish(herald, saturation, saturation, None)
            seqs = list(range(saturation, 2 * saturation))
            _wait(arrivals, seqs, 900, follower)
            runs.append(
                Run(
                    f"{label}: saturation, pipelined",
                    saturation,
                    (max(arrivals.at_ms[s] for s in seqs) - min(sent.values())) / 1000,
                    peak_rss_each_mb=group.peak_rss_each_mb(),
                )
            )

            offered = int(rate * duration_s)
            echo(f"  {label}: offering {offered} intents at {rate:.0f}/s")
            sent = _publish(herald, 2 * saturation, offered, rate)
            seqs = list(range(2 * saturation, 2 * saturation + offered))
            _wait(arrivals, seqs, 900, follower)
            runs.append(
                Run(
                    f"{label}: latency at {rate:.0f} intents/s",
                    offered,
                    (max(arrivals.at_ms[s] for s in seqs) - min(sent.values())) / 1000,
                    latencies_ms=[arrivals.at_ms[s] - sent[s] for s in seqs],
                    peak_rss_each_mb=group.peak_rss_each_mb(),
                )
            )
    finally:
        if group is not None:
            group.stop()
        if follower is not None:
            follower.stop()
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
    workers: int = 1,
    http_rate: float = 500.0,
    http_duration_s: float = 10.0,
    http_only: bool = False,
) -> list[Run]:
    """Every run, printed as it finishes; topics deleted at the end. ``workers`` worker
    processes serve the push runs (the email runs have one). The HTTP runs
    (pipeline.ops.bench_http) come last, or alone with ``http_only``."""
    run_id = uuid.uuid4().hex[:8]
    state = base.state_dir / "bench" / run_id
    state.mkdir(parents=True, exist_ok=True)
    settings = _settings_for(base, run_id, state)
    topology_admin.apply(settings, Topology.load(settings))
    runs: list[Run] = []
    http: list[dict[str, Any]] = []

    def done(run: Run) -> None:
        runs.append(run)
        echo(_line(run))

    mail: Settings | None = None
    try:
        if http_only:
            http = _http(settings, http_rate, http_duration_s, state, echo)
            return runs
        if baselines:
            _make_topics(
                settings, ["bench.raw.in", "bench.raw.out", "bench.faust.in", "bench.faust.out"]
            )
            echo("baselines")
            done(raw_passthrough(settings, intents))
            done(faust_passthrough(settings, intents, state))
        echo("pipeline")
        for run in pipeline_runs(
            settings, "push", intents, rate, duration_s, state, echo, workers=workers
        ):
            done(run)
        if email_intents:
            mail = _settings_for(base, f"{run_id}m", state)
            topology_admin.apply(mail, Topology.load(mail))
            for run in pipeline_runs(mail, "email", email_intents, rate, duration_s, state, echo):
                done(run)
        # Last, on a broker the runs before have warmed up (a fresh broker's JIT made
        # single runs' P99 ten times longer), and before any topic is deleted
        # (a deletion keeps the one broker busy): docs/http-intake.md.
        if http_rate:
            http = _http(settings, http_rate, http_duration_s, state, echo)
    finally:
        if mail is not None:
            topology_admin.delete_prefixed(mail)
        topology_admin.delete_prefixed(settings)
        shares = _ratios(runs, echo)
        figures = [{**run.as_dict(), **shares.get(run.name, {})} for run in runs] + http
        (state / "figures.json").write_text(json.dumps(figures, indent=2))
        echo(f"figures: {state / 'figures.json'}")
    return runs


def _http(
    settings: Settings, rate: float, duration_s: float, state: Path, echo: Echo
) -> list[dict[str, Any]]:
    from pipeline.ops.bench_http import http_runs

    echo(f"HTTP intake, {rate:.0f} requests/s offered for {duration_s:.0f}s")
    # Creating a run's ~140 topics keeps a single broker busy for a few seconds after
    # the admin call returns: let it settle, or the first run measures that.
    time.sleep(_SETTLE_S)
    figures = http_runs(settings, rate, duration_s, state)
    for run in figures:
        echo(
            f"  {run['name']:{_NAME_WIDTH}} {run['count']:7d} requests  P50 {run['p50_ms']:.1f} ms"
            f"  P95 {run['p95_ms']:.1f} ms  P99 {run['p99_ms']:.1f} ms  answers {run['answers']}"
        )
    base, intake = figures
    if base["p99_ms"]:
        echo(f"  P99 of the POST: {intake['p99_ms'] / base['p99_ms']:.2f}x the baseline's")
    return figures


_NAME_WIDTH = 44
_SETTLE_S = 10.0


def _line(run: Run) -> str:
    latency = ""
    if run.latencies_ms:
        p50, p95, p99 = (run.percentile(q) for q in (0.5, 0.95, 0.99))
        latency = f"  P50 {p50:.0f} ms  P95 {p95:.0f} ms  P99 {p99:.0f} ms"
    memory = ""
    if run.peak_rss_mb:
        memory = f"  peak RSS {run.peak_rss_mb:.0f} MiB"
        if len(run.peak_rss_each_mb) > 1:
            memory += " (" + " + ".join(f"{rss:.0f}" for rss in run.peak_rss_each_mb) + ")"
    figures = f"{run.count:7d} in {run.seconds:6.1f}s = {run.rate:8.0f}/s"
    return f"  {run.name:{_NAME_WIDTH}} {figures}{latency}{memory}"


def _ratios(runs: list[Run], echo: Echo) -> dict[str, dict[str, float]]:
    """Print each pipeline rate as a share of this bench run's baselines; the shares
    by run name (``of_raw``, ``of_faust``) for figures.json."""
    by_name = {run.name: run for run in runs}
    bases = [
        (key, short, by_name[name])
        for key, short, name in (("of_faust", "Faust", _FAUST), ("of_raw", "raw", _RAW))
        if name in by_name and by_name[name].rate
    ]
    shares: dict[str, dict[str, float]] = {}
    if not bases:
        return shares
    echo("pipeline rates as shares of the passthroughs")
    for run in runs:
        if run.name in (_RAW, _FAUST):
            continue
        shares[run.name] = {key: round(run.rate / base.rate, 5) for key, _, base in bases}
        text = "  ".join(f"{run.rate / base.rate:7.2%} of {short}" for _, short, base in bases)
        echo(f"  {run.name:{_NAME_WIDTH}} {text}")
    return shares
