"""``odoo-bin mqtt bench``: how fast this addon stores MQTT messages in a real Odoo database.

Run it on a database where mqtt_listener is installed (a copy or a test database rather than
production: see "What it needs" below)::

    odoo-bin --addons-path=<odoo>/addons,<this repository> mqtt bench -c odoo.conf -d <db> \\
        [--json] [--messages 20000] [--baseline-messages 2000] [--rate 2000] [--seconds 10]

``--addons-path=…`` must be the first argument (that is how Odoo finds the ``mqtt`` command);
database settings (``-c``, ``--db_host``, ``--db_user``, …) are Odoo's own.

What it measures, in one run
----------------------------

It starts a private mosquitto on a free port of 127.0.0.1 and creates, through the ORM, one
broker and one subscription pointing at it (QoS 1, deduplication by the JSON key ``n``). Then:

1. **ingest**: ``--messages`` numbered QoS 1 messages (~100-byte JSON) are queued on the broker
   for the listener's persistent session, then the engine's runner, in this process and exactly
   as a server runs it, drains them into ``mqtt_publish_signal_history`` (batch commit, then the
   acknowledgement). The rate is messages over the time from the first to the last commit
   (``create_date``); *lost* counts published (and PUBACKed) numbers with no stored row,
   *duplicates* numbers stored twice.
2. **baseline**: ``--baseline-messages`` through the original module's approach: a paho
   subscriber that, in its network callback, opens a cursor, calls the ORM's
   ``env['mqtt.publish.signal.history'].create()`` and commits, once per message.
3. **latency**: with the runner live, a publisher sends at ``--rate`` msg/s for ``--seconds``;
   p50 and p99 are from the publish (the time in the payload) to the commit (the runner's
   ``on_stored`` callback).

It prints each figure, the ratio to the baseline and the targets (ingest >= 5,000 msg/s, >= 10
times the baseline, nothing lost); with ``--json`` its last line on stdout is one JSON object
(``ingest_msgs_per_s``, ``baseline_msgs_per_s``, ``ingest_vs_baseline``, ``p50_ms``, ``p99_ms``,
``lost``, ``duplicates``, …). Odoo's log goes to stderr as usual. Exit status: 0 the run
completed with nothing lost, 1 it failed or lost messages, 2 it refused to run.

Why a private mosquitto
-----------------------

A stock mosquitto keeps at most 1,000 QoS 1 messages queued per client
(``max_queued_messages 1000``) and silently drops the rest: on a 20,000-message burst "lost"
would measure the broker, not Odoo. The private broker has no queue, byte or in-flight limit
and no persistence; it is stopped at the end. Set ``MQTT_BENCH_MOSQUITTO`` to the mosquitto
binary if it is not on ``PATH`` or in ``/usr/sbin``.

What it needs, and what it leaves
---------------------------------

It refuses to run (exit 2, with the reason) when the database has no mqtt_listener installed,
when the MQTT service of the database is stopped, when another runner (an Odoo server, an
``odoo-bin mqtt``) is active on the database, or when the database has enabled brokers of its
own: the bench's runner would otherwise listen to them, and the other runner would take the
bench's messages. Stop that runner or use a copy of the database.

Everything it creates is removed at the end, on failure, Ctrl-C or SIGTERM too: its broker and
subscription, every history and user property row of that broker, the broker state rows and
its runner row (mode ``bench``). Only a SIGKILL leaves them: the broker is then named
``mqtt bench (temporary) …``, and the next run removes such leftovers first.

Figures depend on the machine: on a shared or busy host (tests running beside it) they are
noisy; run it twice and read the better run, or run it on an idle machine.
"""

# A command: its output is the report, and it commits what the runner must see.
# pylint: disable=print-used,invalid-commit
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid

import psycopg2

from mqtt_engine import __version__ as engine_version
from mqtt_engine import bench as engine_bench
from mqtt_engine import schema
from mqtt_engine.payload import from_column
from mqtt_engine.runner import Runner, tune_garbage_collector
from mqtt_engine.store_pg import KEEPALIVES, PostgresStore

from odoo import SUPERUSER_ID, api, fields, release
from odoo.modules.registry import Registry

from .supervisor import database_dsn

_logger = logging.getLogger("odoo.addons.mqtt_listener.bench")

BENCH_NAME = "mqtt bench (temporary)"
"""Prefix of the broker the bench creates; leftovers of a killed run are found by it."""
LATENCY_START = 10_000_000
BASELINE_START = 20_000_000
STALL_TIMEOUT = 60.0
"""Seconds without a new committed row after which the ingest stops waiting (and counts lost)."""
TARGET_RATE = 5000
TARGET_RATIO = 10


class BenchRefused(Exception):
    """The database is not one the bench may run on; the message says why."""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _mosquitto() -> str:
    return (
        os.environ.get("MQTT_BENCH_MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    )


def _check_database(dbname: str) -> None:
    """Raise :class:`BenchRefused` unless ``dbname`` is reachable and has the addon installed."""
    try:
        connection = psycopg2.connect(database_dsn(dbname), connect_timeout=10, **KEEPALIVES)
    except psycopg2.Error as exc:
        raise BenchRefused(f"cannot connect to database {dbname!r}: {exc}".strip()) from exc
    try:
        with connection.cursor() as cr:
            cr.execute("SELECT to_regclass('ir_module_module') IS NOT NULL")
            if not cr.fetchone()[0]:
                raise BenchRefused(f"database {dbname!r} is not an Odoo database")
            cr.execute("SELECT state FROM ir_module_module WHERE name = 'mqtt_listener'")
            row = cr.fetchone()
            if not row or row[0] != "installed":
                state = row[0] if row else "unknown to this database"
                raise BenchRefused(
                    f"mqtt_listener is not installed in database {dbname!r} (state: {state}); "
                    "install it first (odoo-bin ... -d <db> -i mqtt_listener --stop-after-init)"
                )
            cr.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                "AND classid = %s AND objid = %s AND objsubid = 1)",
                (schema.LOCK_KEY >> 32, schema.LOCK_KEY & 0xFFFFFFFF),
            )
            if cr.fetchone()[0]:
                raise BenchRefused(_other_runner_text(cr, dbname))
    finally:
        connection.close()


def _other_runner_text(cr, dbname: str) -> str:
    cr.execute(
        "SELECT name, mode FROM mqtt_runner WHERE role = 'active' "
        "ORDER BY heartbeat_at DESC NULLS LAST LIMIT 1"
    )
    row = cr.fetchone()
    who = f" ({row[0]}, {row[1]})" if row else ""
    return (
        f"another MQTT runner{who} is active on database {dbname!r}: it would take the bench's "
        "messages. Stop it (the Odoo server or odoo-bin mqtt) or benchmark a copy of the database"
    )


def _raise_on_sigterm(signum, _frame):
    raise SystemExit(128 + signum)


class OdooBench:
    """One run of the benchmark on one database; :meth:`cleanup` undoes what it created."""

    def __init__(self, dbname: str, options):
        self.dbname = dbname
        self.options = options
        self.token = uuid.uuid4().hex[:8]
        self.topic = f"bench/odoo/{self.token}"
        self.baseline_topic = f"bench/odoo/{self.token}/baseline"
        self.registry = None
        self.directory: str | None = None
        self.mosquitto = None
        self.runner: Runner | None = None
        self.clock = engine_bench.CommitClock()
        self.broker_id: int | None = None
        self.subscription_id: int | None = None
        self.client_id: str | None = None
        self.states_before: set[int] = set()

    # -- helpers ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def env(self):
        """A superuser environment on a fresh cursor, committed when the block succeeds."""
        with self.registry.cursor() as cr:
            yield api.Environment(cr, SUPERUSER_ID, {})

    def query(self, sql: str, params=()) -> list[tuple]:
        with self.registry.cursor() as cr:
            cr.execute(sql, params)
            return cr.fetchall()

    # -- preparation -----------------------------------------------------------------------
    def prepare(self) -> None:
        self.registry = Registry(self.dbname)
        # As a process that serves the runner alone, once the registry is loaded: it is never
        # rescanned either (see the function's doc).
        tune_garbage_collector()
        with self.env() as env:
            self._remove_leftovers(env)
            env.cr.execute("SELECT desired_state FROM mqtt_service ORDER BY id LIMIT 1")
            row = env.cr.fetchone()
            if row and (row[0] or "running") != "running":
                raise BenchRefused(
                    f"the MQTT service of database {self.dbname!r} is stopped: start it (MQTT > "
                    "Service > Start, or env['mqtt.service'].start_mqtt_service()) and run again"
                )
            own = env["mqtt.broker"].search([("enabled", "=", True)])
            if own:
                names = ", ".join(repr(name) for name in own.mapped("name")[:5])
                raise BenchRefused(
                    f"database {self.dbname!r} has enabled brokers ({names}): the bench's runner "
                    "would listen to them too. Benchmark a copy of the database without them, "
                    "or disable them (Stop on the broker) for the run"
                )
            env.cr.execute("SELECT broker_id FROM mqtt_broker_state")
            self.states_before = {broker_id for (broker_id,) in env.cr.fetchall()}

        self.directory = tempfile.mkdtemp(prefix="mqtt-odoo-bench-")
        binary = _mosquitto()
        if not os.path.exists(binary):
            raise RuntimeError(f"mosquitto not found ({binary}); set MQTT_BENCH_MOSQUITTO")
        self.mosquitto = engine_bench.Broker(binary, self.directory)

        # The runner first, so the lock is ours before the broker exists: no other runner can
        # see the broker and take its messages.
        self.runner = Runner(
            [PostgresStore(database_dsn(self.dbname), name=self.dbname)],
            mode="bench",
            on_stored=self.clock,
            heartbeat=2.0,
            logger=logging.getLogger("odoo.addons.mqtt_listener.runner"),
        )
        self.runner.start()
        deadline = time.monotonic() + 15
        while not self.runner.is_active(self.dbname):
            if time.monotonic() > deadline:
                with self.registry.cursor() as cr:
                    raise BenchRefused(_other_runner_text(cr, self.dbname))
            time.sleep(0.05)

        with self.env() as env:
            broker = env["mqtt.broker"].create(
                {
                    "name": f"{BENCH_NAME} {self.token}",
                    "host": "127.0.0.1",
                    "port": self.mosquitto.port,
                    "protocol": "5",
                    "enabled": False,  # the flood is queued first, then the runner drains it
                    "receive_maximum": 2000,
                }
            )
            subscription = env["mqtt.subscription"].create(
                {
                    "broker_id": broker.id,
                    "topic_filter": self.topic,
                    "qos": "1",
                    "dedup_mode": "json",
                    "dedup_key": "n",
                }
            )
            self.broker_id, self.subscription_id = broker.id, subscription.id
            self.client_id = broker.client_id

    def _remove_leftovers(self, env) -> None:
        """Remove what a killed run left (only called once no other runner holds the lock)."""
        env.cr.execute("DELETE FROM mqtt_runner WHERE mode = 'bench'")
        brokers = (
            env["mqtt.broker"]
            .with_context(active_test=False)
            .search([("name", "=like", f"{BENCH_NAME} %")])
        )
        if brokers:
            _logger.warning(
                "removing %d broker(s) left by an interrupted mqtt bench: %s",
                len(brokers),
                ", ".join(brokers.mapped("name")),
            )
            self._delete_rows(env.cr, brokers.ids)
            brokers.with_context(active_test=False).subscription_ids.unlink()
            brokers.unlink()

    # -- the three phases ------------------------------------------------------------------
    def ingest(self) -> dict:
        count = self.options.messages
        engine_bench.register_session(self.mosquitto.port, self.client_id, self.topic)
        engine_bench.publish_numbered(self.mosquitto.port, count, topic=self.topic)
        with self.env() as env:
            env["mqtt.broker"].browse(self.broker_id).write({"enabled": True})
        last_count, last_progress = 0, time.monotonic()
        while len(self.clock) < count:
            time.sleep(0.1)
            if len(self.clock) != last_count:
                last_count, last_progress = len(self.clock), time.monotonic()
            elif time.monotonic() - last_progress > STALL_TIMEOUT:
                _logger.warning(
                    "ingest: no new row for %.0fs, %d of %d stored; counting the rest as lost",
                    STALL_TIMEOUT,
                    last_count,
                    count,
                )
                break
        rows = self.query(
            "SELECT payload, state, EXTRACT(EPOCH FROM create_date) "
            "FROM mqtt_publish_signal_history WHERE broker_id = %s AND direction = 'in'",
            (self.broker_id,),
        )
        numbers = [
            json.loads(from_column(payload))["n"] for payload, state, _ in rows if state != "failed"
        ]
        stamps = [float(stamp) for _, _, stamp in rows]
        lost, duplicates = engine_bench.lost_and_duplicates(numbers, range(count))
        span = max(stamps) - min(stamps) if stamps else 0.0
        return {
            "rate": (len(rows) - 1) / max(span, 1e-9) if len(rows) > 1 else 0.0,
            "stored": len(rows),
            "failed": sum(1 for _, state, _ in rows if state == "failed"),
            "lost": lost,
            "duplicates": duplicates,
        }

    def baseline(self) -> dict:
        count = self.options.baseline_messages
        client_id = f"mqtt-bench-baseline-{self.token}"
        port = self.mosquitto.port
        engine_bench.register_session(port, client_id, self.baseline_topic)
        engine_bench.publish_numbered(port, count, BASELINE_START, topic=self.baseline_topic)
        registry, broker_id, subscription_id = self.registry, self.broker_id, self.subscription_id

        def create_and_commit(message):
            # The original module: a cursor, an ORM create and a commit per message, right in
            # paho's network callback (paho acknowledges when the callback returns).
            with registry.cursor() as cr:
                env = api.Environment(cr, SUPERUSER_ID, {})
                env["mqtt.publish.signal.history"].create(
                    {
                        "broker_id": broker_id,
                        "subscription_id": subscription_id,
                        "direction": "in",
                        "state": "received",
                        "topic": message.topic,
                        "payload": base64.b64encode(message.payload),
                        "qos": message.qos,
                        "retain": bool(message.retain),
                        "received_at": fields.Datetime.now(),
                    }
                )
                cr.commit()

        rate = engine_bench.drain_subscriber(port, client_id, count, create_and_commit)
        return {"rate": rate}

    def latency(self) -> dict:
        rate, seconds = self.options.rate, self.options.seconds
        if not engine_bench.wait_subscribed(self.runner, self.broker_id):
            raise RuntimeError("the runner is not subscribed to the bench broker")

        def rows_after(before):
            return self.query(
                "SELECT id, payload FROM mqtt_publish_signal_history "
                "WHERE broker_id = %s AND direction = 'in' AND id > %s",
                (self.broker_id, before),
            )

        return engine_bench.time_to_commit(
            self.mosquitto.port,
            self.clock,
            rows_after,
            rate,
            seconds,
            topic=self.topic,
            start=LATENCY_START,
        )

    # -- cleanup ---------------------------------------------------------------------------
    @staticmethod
    def _delete_rows(cr, broker_ids: list[int]) -> int:
        """Delete the history, user property and state rows of ``broker_ids``; returns rows."""
        if not broker_ids:
            return 0
        ids = tuple(broker_ids)
        cr.execute(
            "DELETE FROM mqtt_user_property WHERE message_id IN "
            "(SELECT id FROM mqtt_publish_signal_history WHERE broker_id IN %s)",
            (ids,),
        )
        cr.execute("DELETE FROM mqtt_publish_signal_history WHERE broker_id IN %s", (ids,))
        deleted = cr.rowcount
        cr.execute("DELETE FROM mqtt_broker_state WHERE broker_id IN %s", (ids,))
        return deleted

    def cleanup(self) -> None:
        """Undo everything :meth:`prepare` and the phases created; each step on its own."""
        steps = []
        if self.runner is not None:
            steps.append(("stop the runner", self.runner.stop))
        if self.registry is not None:
            steps.append(("remove the bench's rows", self._cleanup_rows))
        if self.mosquitto is not None:
            steps.append(("stop mosquitto", self.mosquitto.stop))
        if self.directory is not None:
            steps.append(
                (
                    "remove the temporary directory",
                    lambda: shutil.rmtree(self.directory, ignore_errors=True),
                )
            )
        for what, step in steps:
            try:
                step()
            except Exception:
                _logger.exception("mqtt bench cleanup: could not %s", what)
        self.runner = self.mosquitto = self.directory = None

    def _cleanup_rows(self) -> None:
        with self.env() as env:
            cr = env.cr
            deleted = 0
            if self.broker_id is not None:
                deleted = self._delete_rows(cr, [self.broker_id])
                env["mqtt.subscription"].with_context(active_test=False).search(
                    [("broker_id", "=", self.broker_id)]
                ).unlink()
                env["mqtt.broker"].with_context(active_test=False).browse(
                    self.broker_id
                ).exists().unlink()
            # State rows the bench's runner wrote for brokers that had none before it.
            cr.execute("SELECT broker_id FROM mqtt_broker_state")
            new_states = {b for (b,) in cr.fetchall()} - self.states_before
            if new_states:
                cr.execute(
                    "DELETE FROM mqtt_broker_state WHERE broker_id IN %s", (tuple(new_states),)
                )
            if self.runner is not None:
                cr.execute("DELETE FROM mqtt_runner WHERE name = %s", (self.runner.name,))
        if self.broker_id is not None:
            _logger.info("mqtt bench: cleaned up (broker, subscription, %d history rows)", deleted)
        self.broker_id = None

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        options = self.options
        self.prepare()
        _say(
            f"mqtt bench: database {self.dbname}, Odoo {release.version}, mqtt_engine "
            f"{engine_version}; a private mosquitto on 127.0.0.1:{self.mosquitto.port}"
        )
        _say(
            "  (no queue limits: a stock mosquitto drops QoS 1 messages beyond 1,000 queued per "
            "client, which would make 'lost' measure the broker)"
        )
        _say(
            f"(1) ingest: {options.messages:,} QoS 1 messages queued for the runner's persistent "
            "session, drained into mqtt_publish_signal_history …"
        )
        ingest = self.ingest()
        _say(
            f"    {ingest['rate']:,.0f} msg/s (first to last commit), {ingest['stored']:,} rows, "
            f"lost {ingest['lost']}, duplicates {ingest['duplicates']}, failed {ingest['failed']}"
        )
        _say(
            f"(2) baseline: the original module's ORM create + commit per message in paho's "
            f"callback, {options.baseline_messages:,} messages …"
        )
        baseline = self.baseline()
        _say(f"    {baseline['rate']:,.0f} msg/s")
        _say(
            f"(3) latency: runner live, {options.rate:,} msg/s for {options.seconds:g} s, "
            "publish to commit …"
        )
        latency = self.latency()
        _say(
            f"    p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms "
            f"({latency['samples']:,} of {int(options.rate * options.seconds):,} messages)"
        )
        ratio = ingest["rate"] / baseline["rate"] if baseline["rate"] else None
        return {
            "database": self.dbname,
            "odoo": release.version,
            "messages": options.messages,
            "baseline_messages": options.baseline_messages,
            "ingest_msgs_per_s": round(ingest["rate"]),
            "baseline_msgs_per_s": round(baseline["rate"]),
            "ingest_vs_baseline": round(ratio, 1) if ratio else None,
            "p50_ms": latency["p50_ms"],
            "p99_ms": latency["p99_ms"],
            "latency_rate": options.rate,
            "latency_samples": latency["samples"],
            "latency_expected": int(options.rate * options.seconds),
            "lost": ingest["lost"],
            "duplicates": ingest["duplicates"],
            "failed": ingest["failed"],
        }


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def run_bench(dbname: str, options) -> int:
    """Run the benchmark on ``dbname``; see the module docstring. Returns the exit status."""
    try:
        _check_database(dbname)
    except BenchRefused as exc:
        print(f"mqtt bench: {exc}", file=sys.stderr)
        return 2
    bench = OdooBench(dbname, options)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        results = bench.run()
    except BenchRefused as exc:
        print(f"mqtt bench: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        print("mqtt bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    except Exception:
        _logger.exception("mqtt bench failed")
        return 1
    finally:
        bench.cleanup()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    rate, ratio = results["ingest_msgs_per_s"], results["ingest_vs_baseline"]
    _say()
    _say(
        f"ingest {rate:,} msg/s (target >= {TARGET_RATE:,}: {_verdict(rate >= TARGET_RATE)}), "
        f"{ratio}x the baseline's {results['baseline_msgs_per_s']:,} msg/s "
        f"(target >= {TARGET_RATIO}: {_verdict(bool(ratio) and ratio >= TARGET_RATIO)}), "
        f"lost {results['lost']} (target 0: {_verdict(results['lost'] == 0)}), "
        f"duplicates {results['duplicates']}, p50 {results['p50_ms']} ms, "
        f"p99 {results['p99_ms']} ms"
    )
    _say(
        "(figures depend on the host: on a busy or shared machine they are noisy; compare runs "
        "on an idle one)"
    )
    if options.json:
        _say(json.dumps(results))
    return 0 if results["lost"] == 0 else 1
