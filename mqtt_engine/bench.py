"""``bench``: how fast the engine stores a QoS 1 flood into PostgreSQL, against two baselines.

Everything is measured in the same run, on a mosquitto the benchmark starts itself (with no
queue or in-flight limits, so the broker drops nothing) and a PostgreSQL database it creates
and drops:

(a) *ceiling*: a bare paho subscriber that only counts (paho acknowledges by itself);
(b) *engine*: ``mqtt-engine run`` in its own process, storing into PostgreSQL and acknowledging
    after the commit (its peak RSS is read from ``/proc``);
(c) *baseline*: one INSERT and COMMIT per message in paho's network callback, the approach of
    the module this project replaces.

For (a), (b) and (c) the messages (numbered ~100-byte JSON) are queued on the broker for the
subscriber's persistent session first, then drained: the rate is messages over the time from
the first to the last one. Then the latency from publish to commit is measured with the engine
running while a publisher sends at a fixed rate (``--rate``, 2,000/s). Lost and duplicate
counts come from the stored numbers. ``--json`` ends with one JSON object of the figures.

This machine's speed drifts by ±15 % within a minute (a shared virtual machine): (a), (b) and
(c) run back to back in each of ``--rounds`` rounds (3), each round's ratios are taken from
its own figures, and the medians are reported, with every round's figures printed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

TOPIC = "bench/flood"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=100_000, help="flood size (a) and (b)")
    parser.add_argument("--baseline-messages", type=int, default=5_000, help="flood size (c)")
    parser.add_argument("--rate", type=int, default=2_000, help="latency phase: msg/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="latency phase length")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of (a), (b) and (c); medians are reported"
    )
    parser.add_argument(
        "--pg",
        default=os.environ.get(
            "MQTT_TEST_PG", "host=127.0.0.1 port=5432 user=root dbname=postgres"
        ),
        help="libpq DSN of a server where the benchmark may create a database",
    )
    parser.add_argument("--mosquitto", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: Linux sends it SIGTERM when the benchmark dies, even of a SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() still ends it on every other exit


class Broker:
    """A private mosquitto that never drops: no queue, byte or in-flight limits."""

    def __init__(self, binary: str, directory: str):
        self.port = _free_port()
        conf = os.path.join(directory, "mosquitto.conf")
        # As root, mosquitto would switch to its own user, which clears the parent-death
        # signal (_die_with_parent): it stays root, listening on 127.0.0.1 only.
        user = "user root\n" if os.geteuid() == 0 else ""
        with open(conf, "w") as handle:
            handle.write(
                f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 0\n"
                f"persistence false\n{user}"
            )
        self.process = subprocess.Popen(
            [binary, "-c", conf],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _client(client_id: str, port: int, **kwargs) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **kwargs
    )
    return client


def _connect(client: mqtt.Client, port: int, clean: bool) -> None:
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    properties.ReceiveMaximum = 2000
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port, keepalive=60, clean_start=clean, properties=properties)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError("no CONNACK from the benchmark broker")


def register_session(port: int, client_id: str, topic: str = TOPIC) -> None:
    """Create the persistent session of ``client_id`` with its subscription, then leave."""
    client = _client(client_id, port)
    _connect(client, port, clean=True)
    done = threading.Event()
    client.on_subscribe = lambda *a: done.set()
    client.subscribe(topic, qos=1)
    if not done.wait(10):
        raise RuntimeError("no SUBACK")
    client.disconnect()
    client.loop_stop()


def publish_numbered(
    port: int, count: int, start: int = 0, rate: float | None = None, topic: str = TOPIC
) -> None:
    """Publish ``count`` numbered QoS 1 messages (~100-byte JSON), waiting for every PUBACK.

    Each payload is ``{"n": <number>, "t": <time.time() at publish>, ...}``: ``n`` is the
    deduplication key and the basis of the lost and duplicate counts, ``t`` of the latency.
    """
    client = _client(f"bench-pub-{uuid.uuid4().hex[:6]}", port)
    client.max_inflight_messages_set(1000)
    _connect(client, port, clean=True)
    pad = "x" * 40
    infos: collections.deque = collections.deque()
    began = time.monotonic()
    for n in range(start, start + count):
        body = json.dumps({"n": n, "t": time.time(), "sensor": "bench-01", "pad": pad})
        infos.append(client.publish(topic, body, qos=1))
        if len(infos) > 30_000:  # packet ids are 16 bits: never have 65,535 outstanding
            infos.popleft().wait_for_publish(60)
        if rate:
            delay = began + (n - start + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def drain_subscriber(
    port: int,
    client_id: str,
    count: int,
    handle: Callable[[mqtt.MQTTMessage], None] | None = None,
    timeout: float = 600.0,
) -> float:
    """Resume ``client_id``'s persistent session and take ``count`` messages. Returns msg/s.

    ``handle(message)`` runs in paho's network callback for each message; paho acknowledges
    the message when it returns. The rate is over the time from the first to the last message.
    An exception in ``handle`` ends the drain and is raised here.
    """
    stamps: list[float] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def on_message(_client, _userdata, message):
        if done.is_set():
            return
        try:
            if handle is not None:
                handle(message)
        except Exception as exc:  # raised in the caller's thread, not lost in paho's
            errors.append(exc)
            done.set()
            return
        stamps.append(time.monotonic())
        if len(stamps) >= count:
            done.set()

    client = _client(client_id, port)
    client.on_message = on_message
    _connect(client, port, clean=False)
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    if errors:
        raise RuntimeError(f"storing a message failed: {errors[0]!r}") from errors[0]
    if len(stamps) < 2:
        raise RuntimeError(f"only {len(stamps)} of {count} messages arrived in {timeout:.0f}s")
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def drain_bare(port: int, client_id: str, count: int) -> float:
    """(a): a paho subscriber that only counts. Returns msg/s."""
    return drain_subscriber(port, client_id, count)


def drain_commit_per_message(port: int, client_id: str, count: int, dsn: str) -> float:
    """(c): one INSERT and COMMIT per message in the network callback. Returns msg/s.

    Like for like: each message becomes the same row the engine writes (preview, hash, dedup
    key, received time), prepared by the same code; only the transaction per message differs.
    """
    import psycopg2

    from .config import BrokerConfig, SubscriptionConfig
    from .ingest import MessagePreparer
    from .paho_session import inbound_message
    from .store import _HISTORY_INSERT_COLUMNS, history_values, utcnow

    connection = psycopg2.connect(dsn)
    preparer = MessagePreparer(BrokerConfig(id=1, name="baseline"))
    preparer.set_subscriptions((SubscriptionConfig(1, 1, TOPIC, dedup_mode="json", dedup_key="n"),))
    sql = (
        f"INSERT INTO mqtt_publish_signal_history ({', '.join(_HISTORY_INSERT_COLUMNS)}) "
        f"VALUES ({', '.join(['%s'] * len(_HISTORY_INSERT_COLUMNS))})"
    )

    def insert(message):
        row = preparer.prepare(inbound_message(message, 0, True))
        with connection.cursor() as cr:
            cr.execute(sql, history_values(row, utcnow()))
        connection.commit()

    try:
        return drain_subscriber(port, client_id, count, insert)
    finally:
        connection.close()


def lost_and_duplicates(numbers: list[int], expected: range) -> tuple[int, int]:
    """How many of ``expected`` are missing from the stored ``numbers``, how many repeated."""
    unique = set(numbers)
    return len(set(expected) - unique), len(numbers) - len(unique)


class BenchDatabase:
    def __init__(self, admin_dsn: str):
        import psycopg2

        self.admin_dsn = admin_dsn
        self.name = f"mqtt_bench_{uuid.uuid4().hex[:8]}"
        self.admin = psycopg2.connect(admin_dsn)
        self.admin.autocommit = True
        with self.admin.cursor() as cr:
            cr.execute(f'CREATE DATABASE "{self.name}"')
        if "dbname=" in admin_dsn:
            self.dsn = re.sub(r"dbname=\S+", f"dbname={self.name}", admin_dsn)
        else:
            self.dsn = f"{admin_dsn} dbname={self.name}"

    def query(self, sql: str, params=()):
        import psycopg2

        with psycopg2.connect(self.dsn) as connection, connection.cursor() as cr:
            cr.execute(sql, params)
            rows = cr.fetchall() if cr.description else []
        connection.close()
        return rows

    def drop(self) -> None:
        with self.admin.cursor() as cr:
            cr.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (self.name,),
            )
            cr.execute(f'DROP DATABASE IF EXISTS "{self.name}"')
        self.admin.close()


def _numbers(database: BenchDatabase) -> list[int]:
    from .payload import from_column

    rows = database.query(
        "SELECT payload FROM mqtt_publish_signal_history "
        "WHERE direction = 'in' AND state <> 'failed'"
    )
    return [json.loads(from_column(row[0]))["n"] for row in rows]


def _engine_config(directory: str, port: int, dsn: str, client_id: str) -> str:
    path = os.path.join(directory, "engine.toml")
    with open(path, "w") as handle:
        handle.write(
            f'database = {json.dumps(dsn)}\n\n[[broker]]\nname = "bench"\n'
            f'host = "127.0.0.1"\nport = {port}\nclient_id = "{client_id}"\n'
            "receive_maximum = 2000\n\n[[broker.subscription]]\n"
            f'topic_filter = "{TOPIC}"\nqos = 1\ndedup_mode = "json"\ndedup_key = "n"\n'
        )
    return path


def _peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def drain_engine(directory: str, port: int, database: BenchDatabase, count: int) -> dict:
    """(b): the engine as its own process; returns rate, peak RSS, lost and duplicates."""
    client_id = "bench-engine"
    register_session(port, client_id)
    publish_numbered(port, count)
    config = _engine_config(directory, port, database.dsn, client_id)
    process = subprocess.Popen(
        [sys.executable, "-m", "mqtt_engine", "run", "--config", config, "--progress", "3600"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0.0
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            time.sleep(0.2)
            peak = max(peak, _peak_rss_mb(process.pid))
            if process.poll() is not None:
                raise RuntimeError(f"the engine exited: {process.stderr.read()[-2000:]}")
            stored = database.query(
                "SELECT COUNT(*) FROM mqtt_publish_signal_history WHERE direction = 'in'"
            )
            if stored and stored[0][0] >= count:
                break
        peak = max(peak, _peak_rss_mb(process.pid))
    finally:
        process.terminate()
        process.wait(30)
    first, last = database.query(
        "SELECT EXTRACT(EPOCH FROM MIN(create_date)), EXTRACT(EPOCH FROM MAX(create_date)) "
        "FROM mqtt_publish_signal_history WHERE direction = 'in'"
    )[0]
    numbers = _numbers(database)
    lost, duplicates = lost_and_duplicates(numbers, range(count))
    return {
        "rate": (len(numbers) - 1) / max(float(last) - float(first), 1e-9),
        "peak_rss_mb": round(peak, 1),
        "lost": lost,
        "duplicates": duplicates,
    }


class CommitClock:
    """A runner ``on_stored`` callback: when (``time.time()``) each history row was committed."""

    def __init__(self):
        self.committed: dict[int, float] = {}

    def __call__(self, _database: str, _broker_id: int, ids: list[int]) -> None:
        now = time.time()
        for row_id in ids:
            self.committed[row_id] = now

    def __len__(self) -> int:
        return len(self.committed)


def wait_subscribed(runner, broker_id: int | None = None, timeout: float = 20.0) -> bool:
    """Wait until the runner's session for ``broker_id`` (or any broker) holds a subscription."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for database in list(runner.databases.values()):
            for worker_broker, worker in list(database.workers.items()):
                if broker_id not in (None, worker_broker):
                    continue
                if worker.session.status.subscribed:
                    return True
        time.sleep(0.05)
    return False


def percentiles(latencies_ms: list[float]) -> dict:
    """p50 and p99 (ms, one decimal) and the number of samples."""
    ordered = sorted(latencies_ms)
    if not ordered:
        return {"p50_ms": None, "p99_ms": None, "samples": 0}
    return {
        "p50_ms": round(statistics.median(ordered), 1),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1),
        "samples": len(ordered),
    }


def time_to_commit(
    port: int,
    clock: CommitClock,
    rows_after: Callable[[int], list[tuple]],
    rate: int,
    seconds: float,
    topic: str = TOPIC,
    start: int = 10_000_000,
) -> dict:
    """Publish at ``rate`` for ``seconds`` to a live runner; latency of each, publish to commit.

    The runner must already be subscribed to ``topic`` and call ``clock`` as its ``on_stored``.
    ``rows_after(row_id)`` returns ``(id, payload column)`` of the history rows stored after
    ``row_id``: the publish time is read from each stored payload, the commit time from
    ``clock``.
    """
    from .payload import from_column

    before = max(clock.committed, default=0)
    already = len(clock)
    count = int(rate * seconds)
    publish_numbered(port, count, start=start, rate=rate, topic=topic)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(clock) - already < count:
        time.sleep(0.05)
    committed = dict(clock.committed)
    latencies = [
        (committed[row_id] - json.loads(from_column(data))["t"]) * 1000
        for row_id, data in rows_after(before)
        if row_id in committed
    ]
    return percentiles(latencies)


def measure_latency(port: int, database: BenchDatabase, rate: int, seconds: float) -> dict:
    """Engine in this process; publish at ``rate`` and time each message until its commit."""
    from .runner import Runner
    from .standalone import sync_to_store
    from .store_pg import PostgresStore

    store = PostgresStore(database.dsn)
    sync_to_store(
        store,
        {
            "broker": [
                {
                    "name": "bench-live",
                    "host": "127.0.0.1",
                    "port": port,
                    "client_id": "bench-live",
                    "subscription": [{"topic_filter": TOPIC, "qos": 1}],
                }
            ]
        },
    )
    database.query("UPDATE mqtt_broker SET active = FALSE WHERE name = 'bench'")
    clock = CommitClock()
    runner = Runner([store], on_stored=clock, heartbeat=1.0)
    runner.start()
    try:
        wait_subscribed(runner)
        return time_to_commit(
            port,
            clock,
            lambda before: database.query(
                "SELECT id, payload FROM mqtt_publish_signal_history "
                "WHERE id > %s AND direction = 'in'",
                (before,),
            ),
            rate,
            seconds,
        )
    finally:
        runner.stop()


def measure_round(number: int, args: argparse.Namespace, broker: Broker, directory: str, database):
    """One round of (a), (b) and (c), back to back so that they meet the same machine."""
    print(f"round {number}:")
    print(f"  (a) ceiling: bare paho subscriber draining {args.messages:,} QoS 1 messages …")
    register_session(broker.port, f"bench-bare-{number}")
    publish_numbered(broker.port, args.messages)
    ceiling = drain_bare(broker.port, f"bench-bare-{number}", args.messages)
    print(f"      {ceiling:,.0f} msg/s")

    print(f"  (b) engine: storing {args.messages:,} into PostgreSQL, ack after commit …")
    database.query("TRUNCATE mqtt_publish_signal_history CASCADE")
    engine = drain_engine(directory, broker.port, database, args.messages)
    print(
        f"      {engine['rate']:,.0f} msg/s, peak RSS {engine['peak_rss_mb']} MB, "
        f"lost {engine['lost']}, duplicates {engine['duplicates']}"
    )

    print(f"  (c) baseline: commit per message, {args.baseline_messages:,} messages …")
    register_session(broker.port, f"bench-baseline-{number}")
    publish_numbered(broker.port, args.baseline_messages, start=20_000_000)
    baseline = drain_commit_per_message(
        broker.port, f"bench-baseline-{number}", args.baseline_messages, database.dsn
    )
    print(f"      {baseline:,.0f} msg/s")
    figures = {
        "ceiling": ceiling,
        "engine": engine["rate"],
        "baseline": baseline,
        "engine_vs_ceiling": engine["rate"] / ceiling,
        "engine_vs_baseline": engine["rate"] / baseline,
    }
    print(
        f"      engine/ceiling {figures['engine_vs_ceiling']:.2f}, "
        f"engine/baseline {figures['engine_vs_baseline']:.1f}"
    )
    return figures, engine


def main(args: argparse.Namespace) -> int:
    from .standalone import sync_to_store  # noqa: F401 - fail early if the package is broken
    from .store_pg import PostgresStore

    directory = tempfile.mkdtemp(prefix="mqtt-bench-")
    broker = Broker(args.mosquitto, directory)
    database = BenchDatabase(args.pg)
    PostgresStore(database.dsn).create_schema()
    rounds: list[dict] = []
    engines: list[dict] = []
    try:
        for number in range(1, max(1, args.rounds) + 1):
            figures, engine = measure_round(number, args, broker, directory, database)
            rounds.append(figures)
            engines.append(engine)

        print(f"latency: engine live at {args.rate:,} msg/s for {args.seconds:.0f}s …")
        latency = measure_latency(broker.port, database, args.rate, args.seconds)
        print(f"    p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms")
    finally:
        database.drop()
        broker.stop()
        shutil.rmtree(directory, ignore_errors=True)

    def median(key: str) -> float:
        return statistics.median(figures[key] for figures in rounds)

    results = {
        "messages": args.messages,
        "rounds": len(rounds),
        "ceiling_msgs_per_s": round(median("ceiling")),
        "engine_msgs_per_s": round(median("engine")),
        "baseline_msgs_per_s": round(median("baseline")),
        # the ratio of each round (its figures met the same machine), then their median
        "engine_vs_ceiling": round(median("engine_vs_ceiling"), 2),
        "engine_vs_baseline": round(median("engine_vs_baseline"), 1),
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "peak_rss_mb": max(engine["peak_rss_mb"] for engine in engines),
        "lost": sum(engine["lost"] for engine in engines),
        "duplicates": sum(engine["duplicates"] for engine in engines),
        "per_round": [
            {key: round(value, 2) for key, value in figures.items()} for figures in rounds
        ],
    }
    print(
        f"\nmedian of {len(rounds)} round(s): ceiling {results['ceiling_msgs_per_s']:,} msg/s, "
        f"engine {results['engine_msgs_per_s']:,} msg/s, "
        f"baseline {results['baseline_msgs_per_s']:,} msg/s\n"
        f"engine/ceiling {results['engine_vs_ceiling']} (target >= 0.7), "
        f"engine/baseline {results['engine_vs_baseline']} (target >= 10), "
        f"p99 {results['p99_ms']} ms (target <= 100), peak RSS {results['peak_rss_mb']} MB, "
        f"lost {results['lost']}, duplicates {results['duplicates']}"
    )
    if args.json:
        print(json.dumps(results))
    return 0
