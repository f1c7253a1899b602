"""Reliability under real faults: the delivery contract, proven with numbered messages.

Every test runs the standalone runner as a real process (``python -m mqtt_engine run --config
FILE --heartbeat 1``, its log in a file printed when a test fails), a private mosquitto with
no-drop limits (``mosquitto_factory``), a real PostgreSQL database, and a paho publisher that
numbers its messages (``{"n": i, ...}``) and counts the broker's PUBACK/PUBCOMP. Faults are
real: SIGKILL of the runner, SIGTERM of the broker, ``pg_terminate_backend``, a restart and a
SIGKILL of a throwaway PostgreSQL cluster (:mod:`tests.pgcluster`). At the end the numbers in
the database (read back from the stored payloads) are compared with what was published:
every number present, none twice.

Every wait is a condition with a deadline (:func:`wait_for`); the one time window that is
watched on purpose (the retry rate after a wrong password) is :func:`hold_for`, which fails as
soon as the condition breaks.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg2
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from mqtt_engine.payload import from_column
from tests.pgcluster import PgCluster
from tests.support import LogFile, hold_for, wait_for

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------- waiting


def utc_timestamp(value: dt.datetime) -> float:
    """A naive UTC datetime (as the engine stores them) as a POSIX timestamp."""
    return value.replace(tzinfo=dt.timezone.utc).timestamp()


# --------------------------------------------------------------------------------- database


class Db:
    """Reads the engine's tables with short-lived connections (the server may come and go).

    The test's own connections are named ``mqtt_engine_tests``, so cutting the engine's
    (``application_name = 'mqtt_engine'``) never cuts them.
    """

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.name = re.search(r"dbname=(\S+)", dsn).group(1)

    def connect(self):
        connection = psycopg2.connect(
            self.dsn, connect_timeout=5, application_name="mqtt_engine_tests"
        )
        connection.autocommit = True
        return connection

    def query(self, sql: str, params=()) -> list[tuple]:
        connection = self.connect()
        try:
            with connection.cursor() as cr:
                cr.execute(sql, params)
                return cr.fetchall() if cr.description else []
        finally:
            connection.close()

    def try_query(self, sql: str, params=()) -> list[tuple] | None:
        """None when the server is down or the tables do not exist yet."""
        try:
            return self.query(sql, params)
        except psycopg2.Error:
            return None

    def count(self) -> int:
        """Inbound history rows (0 while unreachable or not created yet)."""
        rows = self.try_query(
            "SELECT count(*) FROM mqtt_publish_signal_history WHERE direction = 'in'"
        )
        return rows[0][0] if rows else 0

    def rows(self, columns: str = "*", where: str = "TRUE") -> list[dict]:
        connection = self.connect()
        try:
            with connection.cursor() as cr:
                cr.execute(
                    f"SELECT {columns} FROM mqtt_publish_signal_history "
                    f"WHERE direction = 'in' AND {where} ORDER BY id"
                )
                names = [d.name for d in cr.description]
                return [dict(zip(names, row, strict=True)) for row in cr.fetchall()]
        finally:
            connection.close()

    def numbers(self) -> collections.Counter:
        """How many rows hold each message number (read from the stored payload)."""
        counter: collections.Counter = collections.Counter()
        for row in self.rows("payload"):
            counter[json.loads(from_column(row["payload"]))["n"]] += 1
        return counter

    def broker_state(self) -> dict | None:
        try:
            connection = self.connect()
        except psycopg2.Error:
            return None
        try:
            with connection.cursor() as cr:
                cr.execute("SELECT * FROM mqtt_broker_state ORDER BY broker_id LIMIT 1")
                row = cr.fetchone()
                return (
                    dict(zip([d.name for d in cr.description], row, strict=True)) if row else None
                )
        except psycopg2.Error:
            return None
        finally:
            connection.close()

    def runners(self) -> dict[int, dict]:
        """``mqtt_runner`` rows by pid."""
        try:
            connection = self.connect()
        except psycopg2.Error:
            return {}
        try:
            with connection.cursor() as cr:
                cr.execute("SELECT * FROM mqtt_runner")
                names = [d.name for d in cr.description]
                return {
                    row["pid"]: row
                    for row in (dict(zip(names, r, strict=True)) for r in cr.fetchall())
                }
        except psycopg2.Error:
            return {}
        finally:
            connection.close()

    def engine_backends(self, extra: str = "TRUE") -> list[int]:
        """Pids of the engine's backends on this database matching ``extra`` (SQL)."""
        return [
            pid
            for (pid,) in self.query(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s "
                f"AND application_name = 'mqtt_engine' AND {extra}",
                (self.name,),
            )
        ]

    def terminate(self, pids: list[int]) -> int:
        rows = self.query("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
        return sum(1 for (done,) in rows if done)


def assert_exactly_once(numbers: collections.Counter, total: int) -> None:
    missing = sorted(set(range(total)) - set(numbers))
    twice = sorted(n for n, count in numbers.items() if count > 1)
    extra = sorted(set(numbers) - set(range(total)))
    assert not missing, f"{len(missing)} of {total} numbers lost, e.g. {missing[:20]}"
    assert not twice, f"{len(twice)} numbers stored more than once, e.g. {twice[:20]}"
    assert not extra, f"numbers never published: {extra[:20]}"


class HoldInserts:
    """Hold the engine's INSERTs into the history table back: a SHARE lock in an open
    transaction (reads, and the state rows, go on). :meth:`release` ends it."""

    def __init__(self, db: Db):
        self.connection = db.connect()
        self.connection.autocommit = False
        with self.connection.cursor() as cr:
            cr.execute("LOCK TABLE mqtt_publish_signal_history IN SHARE MODE")

    def release(self) -> None:
        with contextlib.suppress(psycopg2.Error):  # a server restart may have ended it already
            self.connection.rollback()
        with contextlib.suppress(psycopg2.Error):
            self.connection.close()


# ----------------------------------------------------------------------------------- runner


class RunnerProcess(LogFile):
    """``python -m mqtt_engine run --config FILE --heartbeat 1`` as a child process.

    :meth:`start` can be called again after :meth:`kill`: the log file is appended to, with a
    marker line per start.
    """

    def __init__(self, config: Path, log: Path, env: dict | None = None, verbose=False):
        self.config = config
        self.log_path = log
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.verbose = verbose
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> RunnerProcess:
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"===== test: runner start #{self.starts} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mqtt_engine",
                    *(["-v"] if self.verbose else []),
                    "run",
                    "--config",
                    str(self.config),
                    "--heartbeat",
                    "1",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config.parent,
                env=self.env,
                start_new_session=True,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> bool:
        """True, or an AssertionError with the log tail when the process has ended."""
        if not self.alive:
            raise AssertionError(
                f"the runner exited with {self.process.returncode}:\n{self.log_tail()}"
            )
        return True

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 25.0) -> None:
        if not self.alive:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


# -------------------------------------------------------------------------------- publisher


def numbered(n: int) -> bytes:
    return json.dumps({"n": n, "sent": round(time.time(), 6), "pad": "x" * 40}).encode()


class Publisher:
    """Numbered messages from paho at a steady rate; counts PUBACK (QoS 1) / PUBCOMP (QoS 2).

    ``total=None`` publishes until :meth:`stop`. paho reconnects by itself and sends again
    what the broker had not acknowledged, so a broker restart costs the publisher nothing.
    """

    def __init__(
        self,
        port: int,
        topic: str,
        *,
        qos: int = 1,
        rate: float = 2000.0,
        total: int | None = None,
        first: int = 0,
        payload=numbered,
    ):
        self.topic = topic
        self.qos = qos
        self.rate = rate
        self.total = total
        self.first = first
        self.payload = payload
        self.published = 0  # publish() calls made
        self.acked = 0
        self.errors: list[str] = []
        self.connections = 0
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-pub-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv311,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.connect_async("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        wait_for(lambda: self.connections, 10, "the test publisher to connect")
        self._thread = threading.Thread(target=self._run, name="test-publisher", daemon=True)
        self._thread.start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            self.connections += 1

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._guard:
            self.acked += 1

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - started) * self.rate) + 1
            if self.total is not None:
                due = min(due, self.total)
            while self.published < due:
                n = self.first + self.published
                info = self.client.publish(self.topic, self.payload(n), qos=self.qos)
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    self.errors.append(f"publish {n}: {mqtt.error_string(info.rc)}")
                self.published += 1
            if self.total is not None and self.published >= self.total:
                return
            self._stop.wait(0.005)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> int:
        """Stop publishing; returns how many were published."""
        self._stop.set()
        self._thread.join(10)
        return self.published

    def wait_done(self, timeout: float) -> int:
        """Wait until everything is published and acknowledged by the broker."""
        wait_for(
            lambda: not self.running and self.acked >= self.published,
            timeout,
            lambda: (
                f"the broker to acknowledge all published messages "
                f"({self.acked} of {self.published} acknowledged)"
            ),
        )
        assert not self.errors, self.errors[:5]
        return self.published

    def close(self) -> None:
        self._stop.set()
        self.client.disconnect()
        self.client.loop_stop()


# -------------------------------------------------------------------------------------- rig


class Rig:
    """One test's broker, configuration, runner processes and publishers; see :func:`rig`."""

    def __init__(self, tmp_path: Path, mosquitto_factory, topic: str):
        self.tmp_path = tmp_path
        self.mosquitto_factory = mosquitto_factory
        self.topic = topic
        self.brokers = []
        self.runners: list[RunnerProcess] = []
        self.publishers: list[Publisher] = []
        self.clusters: list[PgCluster] = []

    def broker(self, **options):
        broker = self.mosquitto_factory(**options)
        self.brokers.append(broker)
        return broker

    def config(
        self,
        dsn: str,
        broker,
        *,
        qos: int = 1,
        dedup_key: str | None = "n",
        broker_extra: str = "",
    ) -> Path:
        """A standalone TOML file: one broker, one subscription on ``<topic>/#``."""
        path = self.tmp_path / f"engine{len(list(self.tmp_path.glob('engine*.toml')))}.toml"
        dedup = f'dedup_mode = "json"\ndedup_key = "{dedup_key}"\n' if dedup_key else ""
        path.write_text(
            f"database = {json.dumps(dsn)}\n\n"
            "[[broker]]\n"
            'name = "test broker"\n'
            'host = "127.0.0.1"\n'
            f"port = {broker.port}\n"
            f"{broker_extra}\n"
            "[[broker.subscription]]\n"
            f"topic_filter = {json.dumps(self.topic + '/#')}\n"
            f"qos = {qos}\n"
            f"{dedup}"
        )
        return path

    def runner(self, config: Path, **options) -> RunnerProcess:
        log = self.tmp_path / f"runner{len(self.runners)}.log"
        runner = RunnerProcess(config, log, **options).start()
        self.runners.append(runner)
        return runner

    def publisher(self, broker, **options) -> Publisher:
        publisher = Publisher(broker.port, f"{self.topic}/n", **options)
        self.publishers.append(publisher)
        return publisher

    def wait_subscribed(self, db: Db, runner: RunnerProcess, timeout: float = 30) -> int:
        """Wait for the state row to show the subscription granted; returns the QoS granted."""
        wanted = self.topic + "/#"

        def granted():
            runner.check_alive()
            state = db.broker_state()
            if not state or state["state"] != "connected":
                return None
            for line in (state["subscribed"] or "").splitlines():
                topic_filter, _, qos = line.rpartition(" ")
                if topic_filter == wanted:
                    return qos
            return None

        return int(
            wait_for(granted, timeout, lambda: f"the subscription, state {db.broker_state()}")
        )

    def close(self) -> None:
        for publisher in self.publishers:
            with contextlib.suppress(Exception):
                publisher.close()
        for runner in self.runners:
            runner.terminate()
        # Shown by pytest only when the test failed.
        for runner in self.runners:
            print(f"\n----- {runner.log_path.name} (last 80 lines) -----\n{runner.log_tail(80)}")
        for broker in self.brokers:
            print(f"\n----- mosquitto :{broker.port} (last 20 lines) -----\n{broker.log_tail(20)}")
        for cluster in self.clusters:
            print(f"\n----- postgres :{cluster.port} (last 20 lines) -----\n{cluster.log_tail(20)}")


@pytest.fixture
def rig(tmp_path, mosquitto_factory, unique_topic):
    rig = Rig(tmp_path, mosquitto_factory, unique_topic)
    yield rig
    rig.close()


@pytest.fixture
def pg_cluster():
    """A throwaway PostgreSQL cluster, started; its processes are ours to restart and kill."""
    cluster = PgCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


def stored(db: Db, runner: RunnerProcess, at_least: int):
    """A predicate: the runner is alive and at least ``at_least`` rows are stored."""

    def predicate():
        runner.check_alive()
        count = db.count()
        return count if count >= at_least else 0

    return predicate


def broker_connected(db: Db) -> bool:
    """The state row says the runner's broker session is connected."""
    return (db.broker_state() or {}).get("state") == "connected"


def drain(db: Db, runners: list[RunnerProcess], publisher: Publisher, timeout: float) -> int:
    """End the stream (an endless one is stopped, a counted one runs to its end), wait for
    every PUBACK, then for every message in the database; returns how many were published."""
    if publisher.total is None:
        publisher.stop()
    total = publisher.wait_done(timeout)

    def complete():
        for runner in runners:
            runner.check_alive()
        return db.count() >= total

    wait_for(complete, timeout, lambda: f"all {total} messages stored ({db.count()} so far)")
    return total


# ------------------------------------------------------------------------------------ tests


@pytest.mark.timeout(150)
@pytest.mark.parametrize("qos", [1, 2])
def test_runner_killed_mid_stream_loses_nothing_and_stores_nothing_twice(pg_database, rig, qos):
    """SIGKILL of the runner during a stream of 20,000; restarted; every number exactly once.

    At QoS 2 the subscription is configured QoS 2 and the engine asks the broker for QoS 1
    (paho keeps QoS 2 receive state in memory only); the dedup key gives exactly-once.
    """
    total = 20_000
    broker = rig.broker(persistence=True)
    db = Db(pg_database)
    runner = rig.runner(rig.config(pg_database, broker, qos=qos))
    assert rig.wait_subscribed(db, runner) == 1, "QoS 2 subscriptions must be received at QoS 1"

    began = time.monotonic()
    publisher = rig.publisher(broker, qos=qos, rate=3000, total=total)
    wait_for(stored(db, runner, 3000), 60, lambda: f"3,000 stored ({db.count()} so far)")
    published_at_kill = publisher.published
    runner.kill()
    stored_at_kill = db.count()
    assert published_at_kill < total, "the kill must come while the stream is still running"
    runner.start()
    wait_for(
        lambda: runner.check_alive() and db.count() > stored_at_kill,
        30,
        "the restarted runner to store again",
    )
    assert publisher.published > published_at_kill, "the publisher kept publishing"

    drain(db, [runner], publisher, 90)
    assert_exactly_once(db.numbers(), total)
    rows = db.rows("state, qos, redelivered")
    assert len(rows) == total
    assert collections.Counter(r["state"] for r in rows) == {"received": total}
    assert {r["qos"] for r in rows} == {1}
    redelivered = sum(1 for r in rows if r["redelivered"])
    print(
        f"\nQoS {qos}: killed at {stored_at_kill} stored / {published_at_kill} published; "
        f"{redelivered} rows flagged redelivered; {time.monotonic() - began:.1f}s"
    )


@pytest.mark.timeout(120)
def test_broker_restart_mid_stream_loses_nothing_and_reconnects_quickly(pg_database, rig):
    broker = rig.broker(persistence=True)
    db = Db(pg_database)
    runner = rig.runner(rig.config(pg_database, broker))
    rig.wait_subscribed(db, runner)
    publisher = rig.publisher(broker, rate=2500)
    wait_for(stored(db, runner, 2000), 60, lambda: f"2,000 stored ({db.count()} so far)")

    # Let the broker hold thousands for the runner: more than the runner takes unacknowledged
    # (Receive Maximum 2,000), so the broker has them queued, not only in flight.
    blocker = HoldInserts(db)
    wait_for(
        lambda: runner.check_alive() and publisher.acked - db.count() >= 4500,
        30,
        lambda: f"a backlog at the broker ({publisher.acked} acknowledged, {db.count()} stored)",
    )
    held_back = publisher.acked - db.count()
    broker.stop()  # SIGTERM: mosquitto saves its persistence file
    wait_for(
        lambda: (db.broker_state() or {}).get("state") in ("disconnected", "connecting"),
        15,
        lambda: f"the runner to report the broker gone: {db.broker_state()}",
    )
    broker.start()  # same port, same persistence file
    back_at = time.time()

    def reconnected():
        runner.check_alive()
        state = db.broker_state() or {}
        since = state.get("last_connected_at")
        if state.get("state") == "connected" and since and utc_timestamp(since) >= back_at - 0.5:
            return (utc_timestamp(since) - back_at,)
        return None

    (delay,) = wait_for(reconnected, 30, lambda: f"the runner to reconnect: {db.broker_state()}")
    assert delay <= 8.0, f"reconnected {delay:.1f}s after the broker came back"
    blocker.release()
    after = db.count()
    wait_for(stored(db, runner, after + 2000), 60, "storing to go on after the reconnect")
    assert publisher.running, "the stream must still run when the test stops it"

    total = drain(db, [runner], publisher, 90)
    assert_exactly_once(db.numbers(), total)
    assert db.count() == total
    print(
        f"\nbroker restart with {held_back} held back: {total} messages, none lost; "
        f"reconnected {delay:.2f}s after the broker's return"
    )


@pytest.mark.timeout(150)
def test_database_connections_cut_mid_stream(pg_database, rig):
    """``pg_terminate_backend`` of the runner's connections, five times, while messages flow.

    Each cut is a fresh outage after a healthy spell, so each is recovered from within a few
    seconds: the fifth as fast as the first.
    """
    broker = rig.broker(persistence=True)
    db = Db(pg_database)
    runner = rig.runner(rig.config(pg_database, broker))
    rig.wait_subscribed(db, runner)
    publisher = rig.publisher(broker, rate=2000)
    wait_for(stored(db, runner, 1500), 60, "1,500 stored")

    lock_holder = (
        "pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
    )
    # The writer opens its connection last (after the lock's and the control thread's).
    writer = f"NOT {lock_holder} ORDER BY backend_start DESC LIMIT 1"
    cuts = [
        ("every connection", "TRUE"),
        ("the writer's connection", writer),
        ("the lock holder's connection", lock_holder),
        ("every connection", "TRUE"),
        ("every connection", "TRUE"),
    ]
    recoveries = []
    count = 0
    for number, (what, where) in enumerate(cuts, 1):
        # Steady first: all three connections (lock, control, writer) up, messages flowing.
        wait_for(
            lambda c=count: (
                len(db.engine_backends()) == 3
                and broker_connected(db)
                and stored(db, runner, c + 1000)()
            ),
            30,
            lambda n=number: f"steady storing before cut {n}: {db.broker_state()}",
        )
        pids = set(db.engine_backends(where))
        assert pids, f"cut {number}: no backend matches {what}"
        assert db.terminate(list(pids)) == len(pids)
        cut_at = time.monotonic()

        def renewed(pids=pids):
            runner.check_alive()
            backends = set(db.engine_backends())
            return len(backends) == 3 and not backends & pids

        wait_for(renewed, 30, lambda n=number: f"new connections after cut {n}")
        count = db.count()
        wait_for(
            stored(db, runner, count + 200),
            30,
            lambda n=number: f"storing again after cut {n} ({db.count()} stored)",
        )
        recoveries.append(time.monotonic() - cut_at)
        print(
            f"\ncut {number} ({what}, {len(pids)} of 3): storing again {recoveries[-1]:.1f}s later"
        )
        assert publisher.running

    slow = [f"cut {n} {t:.1f}s" for n, t in enumerate(recoveries, 1) if t > 5.0]
    assert not slow, f"recovery after a connection cut should take seconds: {slow}"

    total = drain(db, [runner], publisher, 90)
    assert_exactly_once(db.numbers(), total)
    assert db.count() == total
    runner.check_alive()
    assert runner.starts == 1


@pytest.mark.timeout(180)
def test_database_restart_and_crash_mid_stream(pg_cluster, rig):
    """A restart and a crash of the database server while messages flow and wait uncommitted.

    Before the restart, inserts are held back (a SHARE lock on the history table) until the
    runner holds hundreds of received, uncommitted messages. The restart throws them out of
    the runner; they are all in the database afterwards, so none of them had been acknowledged
    to the broker: the broker still had them to send again.
    """
    rig.clusters.append(pg_cluster)
    broker = rig.broker(persistence=True)
    db = Db(pg_cluster.dsn)
    runner = rig.runner(rig.config(pg_cluster.dsn, broker))
    rig.wait_subscribed(db, runner)
    publisher = rig.publisher(broker, rate=1500)
    count = wait_for(stored(db, runner, 2000), 60, "2,000 stored")

    # 1. Hold the inserts back until the runner has a backlog, then restart the server.
    blocker = HoldInserts(db)

    def backlog_of_500():
        runner.check_alive()
        backlog = (db.broker_state() or {}).get("backlog") or 0
        return backlog if backlog >= 500 else None

    backlog = wait_for(
        backlog_of_500,
        30,
        lambda: f"a backlog of 500 uncommitted messages: {db.broker_state()}",
    )
    held = db.count()
    pg_cluster.restart()  # fast: every session is terminated, ours with its lock too
    blocker.release()
    count = wait_for(
        stored(db, runner, held + backlog + 500),
        60,
        lambda: f"storing again after the restart ({db.count()} stored)",
    )
    assert publisher.running

    # 2. A crash: SIGKILL of every PostgreSQL process, then crash recovery.
    pg_cluster.kill()
    pg_cluster.start()
    count = wait_for(
        stored(db, runner, count + 1500),
        60,
        lambda: f"storing again after the crash ({db.count()} stored)",
    )
    assert publisher.running

    total = drain(db, [runner], publisher, 90)
    assert_exactly_once(db.numbers(), total)
    assert db.count() == total
    runner.check_alive()
    assert runner.starts == 1
    print(
        f"\ndatabase restart with {backlog} uncommitted in the runner, then a crash: "
        f"{total} messages, none lost"
    )


@pytest.mark.timeout(120)
def test_malformed_message_is_failed_and_does_not_stall(pg_database, rig):
    total, bad = 1000, 437
    broken = b'{"n": 437, "oops": not json'
    broker = rig.broker()
    db = Db(pg_database)
    runner = rig.runner(rig.config(pg_database, broker))
    rig.wait_subscribed(db, runner)

    began = time.monotonic()
    publisher = rig.publisher(
        broker, rate=20_000, total=total, payload=lambda n: broken if n == bad else numbered(n)
    )
    publisher.wait_done(30)
    wait_for(stored(db, runner, total), 30, lambda: f"{total} rows ({db.count()} so far)")
    elapsed = time.monotonic() - began

    rows = db.rows("state, error, payload, dedup_key")
    assert len(rows) == total
    failed = [r for r in rows if r["state"] == "failed"]
    assert len(failed) == 1, [r["error"] for r in failed]
    assert from_column(failed[0]["payload"]) == broken
    assert "JSON" in failed[0]["error"], failed[0]["error"]
    assert failed[0]["dedup_key"] is None
    good = [r for r in rows if r["state"] == "received"]
    assert len(good) == total - 1
    numbers = collections.Counter(json.loads(from_column(r["payload"]))["n"] for r in good)
    assert set(numbers) == set(range(total)) - {bad} and max(numbers.values()) == 1
    assert all(r["error"] is None for r in good)
    print(f"\n1 malformed among {total}: all stored {elapsed:.1f}s after the first publish")


@pytest.mark.timeout(120)
def test_binary_payloads_are_stored_byte_exact(pg_database, rig):
    payloads = {
        "all-bytes": bytes(range(256)),
        "nul": b"\x00",
        "nul-in-text": b"abc\x00def",
        "invalid-utf8": b"caf\xe9 \xff\xfe \xc3\x28 \xed\xa0\x80",
        "utf8-text": "température 21,5 °C ✓".encode(),
        "empty": b"",
        "mib-random": os.urandom(1 << 20),
        "mib-nul": bytes(1 << 20),
        "mib-text": b"0123456789abcdef" * (1 << 16),
    }
    broker = rig.broker()
    db = Db(pg_database)
    runner = rig.runner(rig.config(pg_database, broker, dedup_key=None))
    rig.wait_subscribed(db, runner)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-bin-{uuid.uuid4().hex}")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        infos = [
            client.publish(f"{rig.topic}/{name}", data, qos=1) for name, data in payloads.items()
        ]
        for info in infos:
            info.wait_for_publish(20)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
    wait_for(stored(db, runner, len(payloads)), 30, "every payload stored")

    rows = {
        r["topic"].rsplit("/", 1)[1]: r
        for r in db.rows("topic, state, payload, payload_size, payload_hash, payload_preview")
    }
    assert set(rows) == set(payloads)
    for name, data in payloads.items():
        row = rows[name]
        stored_bytes = from_column(row["payload"])
        assert row["state"] == "received", (name, row)
        assert stored_bytes == data, f"{name}: stored bytes differ"
        digest = hashlib.sha256(data).hexdigest()
        assert hashlib.sha256(stored_bytes).hexdigest() == digest == row["payload_hash"], name
        assert row["payload_size"] == len(data), name
        preview = row["payload_preview"]
        assert preview is not None and "\x00" not in preview, (name, preview)
        assert len(preview) <= 600, (name, len(preview))
        if data:
            assert preview, name
    assert rows["empty"]["payload"] is None
    assert rows["utf8-text"]["payload_preview"] == payloads["utf8-text"].decode()
    assert rows["all-bytes"]["payload_preview"].startswith("binary, 256 bytes: 00 01 02")


@pytest.mark.timeout(120)
def test_two_runners_one_connection_and_takeover(pg_database, rig):
    broker = rig.broker(persistence=True)
    db = Db(pg_database)
    config = rig.config(pg_database, broker)
    first = rig.runner(config)
    rig.wait_subscribed(db, first)
    wait_for(lambda: db.runners().get(first.pid, {}).get("role") == "active", 15, "runner 1 active")
    second = rig.runner(config)

    # The second stands by: seen twice (two lock attempts), still standby, still alive.
    beats = set()

    def standing_by():
        second.check_alive()
        row = db.runners().get(second.pid)
        if row:
            assert row["role"] == "standby", row
            beats.add(row["heartbeat_at"])
        return len(beats) >= 2

    wait_for(standing_by, 20, "runner 2 to stand by through two lock attempts")

    def runner_connections() -> list[str]:
        return [
            line
            for line in broker.log_text().splitlines()
            if "New client connected" in line and " as test-pub-" not in line
        ]

    connections = runner_connections()
    assert len(connections) == 1, connections
    client_id = re.search(r" as (\S+) ", connections[0]).group(1)
    assert "already connected" not in broker.log_text()
    state = db.broker_state()
    assert state["state"] == "connected"

    publisher = rig.publisher(broker, rate=5000, total=100)
    publisher.wait_done(20)
    wait_for(stored(db, first, 100), 20, "the first 100 stored by runner 1")

    first.kill()
    killed_at = time.time()
    t0 = time.monotonic()
    during = rig.publisher(broker, rate=5000, total=200, first=100)  # into the session's queue
    during.wait_done(20)

    def taken_over():
        second.check_alive()
        row = db.runners().get(second.pid) or {}
        state = db.broker_state() or {}
        since = state.get("last_connected_at")
        return (
            row.get("role") == "active"
            and state.get("state") == "connected"
            and since is not None
            and utc_timestamp(since) > killed_at - 0.5
        )

    wait_for(taken_over, 15, lambda: f"runner 2 to take over: {db.runners()} {db.broker_state()}")
    takeover = time.monotonic() - t0
    wait_for(stored(db, second, 300), 15, lambda: f"300 stored ({db.count()} so far)")
    after = rig.publisher(broker, rate=5000, total=100, first=300)
    after.wait_done(20)
    wait_for(stored(db, second, 400), 15, lambda: f"400 stored ({db.count()} so far)")
    assert_exactly_once(db.numbers(), 400)

    connections = runner_connections()
    assert len(connections) == 2, connections
    assert all(f" as {client_id} " in line for line in connections), connections
    print(f"\ntakeover: runner 2 active and connected {takeover:.1f}s after kill -9 of runner 1")


@pytest.mark.timeout(120)
def test_wrong_password_is_reported_retried_slowly_and_never_logged(pg_database, rig):
    secret = f"Wr0ng-{uuid.uuid4().hex}"
    broker = rig.broker(users={"engine": f"right-{uuid.uuid4().hex}"})
    db = Db(pg_database)
    config = rig.config(
        pg_database,
        broker,
        broker_extra='username = "engine"\npassword_env = "MQTT_TEST_PASSWORD"\n',
    )
    runner = rig.runner(config, env={"MQTT_TEST_PASSWORD": secret}, verbose=True)

    def attempts() -> int:  # mosquitto logs each refused CONNECT so
        return broker.log_text().count("disconnected, not authorised")

    state = wait_for(
        lambda: (
            runner.check_alive()
            and (db.broker_state() or {}).get("state") == "auth_failed"
            and db.broker_state()
        ),
        20,
        lambda: f"state auth_failed: {db.broker_state()}",
    )
    error = state["last_error"] or ""
    assert "authentication failed" in error, error
    assert "\n" not in error and "Traceback" not in error and len(error) < 200, error
    assert db.query("SELECT password FROM mqtt_broker")[0][0] == secret, "the engine had it"

    first = attempts()
    assert first >= 1
    hold_for(
        lambda: runner.check_alive() and attempts() <= first + 1,
        10,
        lambda: f"slow retries: {attempts() - first} more connection attempts within 10s",
    )
    assert (db.broker_state() or {}).get("state") == "auth_failed"

    log = runner.log_text()
    assert "authentication failed" in log
    assert secret not in log, "the password appears in the runner's log"
    for table in ("mqtt_broker_state", "mqtt_runner"):
        for row in db.query(f"SELECT * FROM {table}"):
            assert secret not in repr(row), f"the password appears in {table}"
    print(
        f"\nwrong password: {attempts()} connection attempt(s) in all, "
        f"{first} before the 10 s watch"
    )


def _iptables() -> str | None:
    """The iptables command, when this process may use it (root, and a kernel that has it)."""
    binary = shutil.which("iptables")
    if binary is None or os.geteuid() != 0:
        return None
    probe = subprocess.run([binary, "-n", "-L", "INPUT"], capture_output=True, check=False)
    return binary if probe.returncode == 0 else None


@pytest.mark.timeout(150)
def test_database_connection_gone_silent_mid_stream(pg_database, rig):
    """The writer's connection stops getting answers (packets dropped, no reset, as when a
    host vanishes): after the DSN's ``tcp_user_timeout`` the writer gives it up, reconnects
    and stores on; nothing is lost or doubled, and the runner never restarts."""
    iptables = _iptables()
    if iptables is None:
        pytest.skip("needs root and iptables (scripts/test installs it) to silence a connection")
    broker = rig.broker(persistence=True)
    db = Db(pg_database)
    runner = rig.runner(rig.config(f"{pg_database} tcp_user_timeout=3000", broker))
    rig.wait_subscribed(db, runner)
    publisher = rig.publisher(broker, rate=1000)
    wait_for(stored(db, runner, 1000), 60, "1,000 stored")
    wait_for(lambda: len(db.engine_backends()) == 3, 30, "the engine's three connections")

    # The writer opens its connection last (after the lock's and the control thread's).
    ((writer_port,),) = db.query(
        "SELECT client_port FROM pg_stat_activity WHERE datname = %s "
        "AND application_name = 'mqtt_engine' AND pid NOT IN (SELECT pid FROM pg_locks "
        "WHERE locktype = 'advisory' AND granted) ORDER BY backend_start DESC LIMIT 1",
        (db.name,),
    )
    server_port = psycopg2.extensions.parse_dsn(pg_database).get("port", "5432")
    rule = ["INPUT", "-p", "tcp", "--sport", str(server_port), "--dport", str(writer_port)]
    rule += ["-j", "DROP"]
    subprocess.run([iptables, "-I", *rule], check=True)
    try:
        wait_for(
            lambda: runner.check_alive() and "writing to the database failed" in runner.log_text(),
            30,
            lambda: f"the writer to give up its silent connection:\n{runner.log_tail(10)}",
        )
    finally:
        subprocess.run([iptables, "-D", *rule], check=True)
    count = db.count()
    wait_for(stored(db, runner, count + 500), 30, lambda: f"storing again ({db.count()} stored)")

    total = drain(db, [runner], publisher, 90)
    assert_exactly_once(db.numbers(), total)
    assert db.count() == total
    runner.check_alive()
    assert runner.starts == 1
