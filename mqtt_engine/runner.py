"""The runner: keeps every database's brokers listening, one active runner per database.

How it works
------------

A :class:`Runner` serves one or more databases (:class:`~mqtt_engine.store.Store`). For each it
runs a control thread (:class:`DatabaseRunner`) that:

* takes the database's runner lock (PostgreSQL: ``pg_try_advisory_lock`` on a dedicated
  connection; SQLite: ``flock``). A runner that does not get it stands *by*, retries every
  ``lock_retry`` seconds (2 by default), and takes over within seconds when the holder dies;
* reads the desired state (``mqtt_service``, ``mqtt_broker``, ``mqtt_subscription``) and
  reconciles: one connected session and one writer per enabled broker, subscriptions changed
  live (no reconnect), a broker whose connection settings changed reconnected, everything
  stopped when the service is switched off;
* wakes on ``NOTIFY mqtt_listener`` (payloads ``config``, ``service``, ``outbox``,
  ``restart`` for every broker, ``restart:<broker id>`` for one) and otherwise re-reads
  every ``poll_interval`` seconds (30 for PostgreSQL, 2 for SQLite, which has no NOTIFY);
* writes the actual state every ``heartbeat`` seconds (5): its own ``mqtt_runner`` row (host,
  pid, mode, active or standby) and one ``mqtt_broker_state`` row per broker (connected or not,
  since when, counts, rates, backlog, subscribed filters, last error).

If the database goes away, the brokers are stopped (nothing uncommitted was acknowledged, so the
broker keeps it) and the thread retries with backoff until the database is back; then it takes
the lock again and resumes. The control thread never dies of an exception: it logs it, waits,
and goes round again.

Log lines to expect (logger ``mqtt_engine.runner``)::

    database odoo: active runner (host:pid), serving 2 brokers
    database odoo: standing by, another runner holds the lock
    database odoo: broker 'plant' connected, 3 subscriptions
    database odoo: lost the database (...); brokers stopped, retrying in 2.0s
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from . import __version__
from .config import BrokerConfig, DesiredState, SubscriptionConfig
from .ingest import BrokerPipeline
from .session import CONNECTED, STOPPED, Session, SubscriptionSpec
from .store import Store, StoreConnection, utc_from_timestamp, utcnow

_logger = logging.getLogger(__name__)

SessionFactory = Callable[..., Session]
OnStored = Callable[[str, int, list[int]], None]  # database, broker id, new history row ids


def label_thread(database: str) -> None:
    """Name the database on the current thread: log formatters (Odoo's too) show ``dbname``."""
    threading.current_thread().dbname = database


def default_session_factory(broker: BrokerConfig, **kwargs) -> Session:
    from .paho_session import PahoSession

    return PahoSession(broker, **kwargs)


def subscription_specs(subscriptions: tuple[SubscriptionConfig, ...]) -> list[SubscriptionSpec]:
    """What the broker is asked for: one spec per broker filter, at the highest QoS wanted."""
    specs: dict[str, SubscriptionSpec] = {}
    for subscription in subscriptions:
        spec = SubscriptionSpec(
            topic_filter=subscription.broker_filter,
            qos=subscription.broker_qos,
            no_local=subscription.no_local,
            retain_as_published=subscription.retain_as_published,
            retain_handling=subscription.retain_handling,
        )
        known = specs.get(spec.topic_filter)
        if known is None or known.qos < spec.qos:
            specs[spec.topic_filter] = spec
    return list(specs.values())


class BrokerWorker:
    """One broker of one database: its session and its pipeline."""

    def __init__(
        self,
        store: Store,
        broker: BrokerConfig,
        session_factory: SessionFactory,
        on_stored: OnStored | None,
        logger: logging.Logger,
        pipeline_options: dict | None = None,
    ):
        self.broker = broker
        self.logger = logger
        callback = None
        if on_stored is not None:
            database = store.name

            def callback(broker_id: int, ids: list[int]) -> None:
                on_stored(database, broker_id, ids)

        self.pipeline = BrokerPipeline(
            store, broker, on_stored=callback, logger=logger, **(pipeline_options or {})
        )
        self.session = session_factory(
            broker,
            client_id=broker.effective_client_id(store.name),
            on_message=self.pipeline.offer,
            on_published=self.pipeline.published,
            logger=logger,
        )
        self.pipeline.attach(self.session)
        self.subscriptions: tuple[SubscriptionConfig, ...] = ()
        self._counted = (time.monotonic(), 0, 0)
        self.rate_in = 0.0
        self.rate_out = 0.0

    def apply(self, subscriptions: tuple[SubscriptionConfig, ...]) -> None:
        if subscriptions == self.subscriptions:
            return
        self.subscriptions = subscriptions
        self.pipeline.set_subscriptions(subscriptions)
        self.session.set_subscriptions(subscription_specs(subscriptions))

    def start(self) -> None:
        self.pipeline.start()
        self.session.start()

    def stop(self) -> None:
        # Close the inbox first: a network thread blocked on a full inbox returns at once,
        # so the session disconnects without waiting out its timeout. What is refused is not
        # acknowledged: the broker keeps it.
        self.pipeline.inbox.close()
        self.session.stop()
        self.pipeline.stop()

    def state_row(self, queued: int) -> dict:
        status = self.session.status
        now = time.monotonic()
        then, stored, sent = self._counted
        elapsed = now - then
        if elapsed >= 1.0:
            self.rate_in = (self.pipeline.stored - stored) / elapsed
            self.rate_out = (self.pipeline.outbox.sent - sent) / elapsed
            self._counted = (now, self.pipeline.stored, self.pipeline.outbox.sent)
        self.pipeline.outbox.queued = queued
        error = status.last_error or self.pipeline.last_error
        if status.silent and status.last_packet_at:
            silence = time.time() - status.last_packet_at
            error = f"watchdog: nothing from the broker for {silence:.0f}s" + (
                f"; {error}" if error else ""
            )
        if status.failed_subscriptions:
            error = "; ".join(
                [error or ""]
                + [f"{f}: {reason}" for f, reason in status.failed_subscriptions.items()]
            ).strip("; ")
        return {
            "broker_id": self.broker.id,
            "state": status.state,
            "state_since": utc_from_timestamp(status.since),
            "last_error": error,
            "last_connected_at": (
                utc_from_timestamp(status.last_connected_at) if status.last_connected_at else None
            ),
            "last_message_at": (
                utc_from_timestamp(self.pipeline.last_message_at)
                if self.pipeline.last_message_at
                else None
            ),
            "messages_in": self.pipeline.stored,
            "messages_out": self.pipeline.outbox.sent,
            "rate_in": round(self.rate_in, 2),
            "rate_out": round(self.rate_out, 2),
            "backlog": self.pipeline.backlog,
            "subscribed": "\n".join(f"{f} {q}" for f, q in sorted(status.subscribed.items())),
            "updated_at": utcnow(),
        }


class LockLost(RuntimeError):
    """The runner lock's connection is gone: another runner may be active now."""


class DatabaseRunner(threading.Thread):
    """The control thread of one database; see the module docstring."""

    def __init__(self, runner: Runner, store: Store):
        super().__init__(name=f"mqtt-runner-{store.name}", daemon=True)
        self.runner = runner
        self.store = store
        self.logger = runner.logger
        self.workers: dict[int, BrokerWorker] = {}
        self.active = False
        self.last_error: str | None = None
        self.started_at = utcnow()
        self._stop_event = threading.Event()
        self._lock = store.lock()
        self._restart: set[int] = set()
        self._served = False  # reconciled and wrote a heartbeat since the last failure
        self._poll_interval = getattr(store, "poll_interval", runner.poll_interval)

    # -- life ---------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop_event.set()
        self._lock.interrupt()

    def run(self) -> None:
        label_thread(self.store.name)
        backoff = 1.0
        announced_standby = False
        while not self._stop_event.is_set():
            connection = None
            try:
                if not self._lock.try_acquire():
                    if not announced_standby:
                        self.logger.info(
                            "database %s: standing by, another runner holds the lock",
                            self.store.name,
                        )
                        announced_standby = True
                    self._write_standby()
                    self._stop_event.wait(self.runner.lock_retry)
                    continue
                announced_standby = False
                self.active = True
                connection = self.store.connect()
                self._serve(connection)
                backoff = 1.0
            except Exception as exc:  # the loop must not die: log, back off, go round again
                if self._served:  # a new outage after a healthy spell, not a repeated failure
                    backoff = 1.0
                    self._served = False
                self.last_error = str(exc).strip() or type(exc).__name__
                # A table that does not exist (SQLSTATE 42P01): the addon is being uninstalled
                # or upgraded; expected, and the supervisor forgets or resumes the database.
                expected = getattr(exc, "pgcode", None) == "42P01"
                self.logger.log(
                    logging.INFO if expected else logging.WARNING,
                    "database %s: %s; brokers stopped, retrying in %.1fs",
                    self.store.name,
                    self.last_error.splitlines()[0],
                    backoff,
                )
                self._stop_workers()
                self._lock.release()
                self.active = False
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                if connection is not None:
                    connection.close()
        self._shutdown()

    def _shutdown(self) -> None:
        self._stop_workers()
        try:
            connection = self.store.connect()
            try:
                if self.active:
                    now = utcnow()
                    connection.write_broker_states(
                        [
                            {
                                "broker_id": b,
                                "state": STOPPED,
                                "state_since": now,
                                "updated_at": now,
                            }
                            for b in connection.active_broker_ids()
                        ]
                    )
                connection.delete_runner(self.runner.name)
            finally:
                connection.close()
        except Exception as exc:
            self.logger.info(
                "database %s: could not remove the runner row (%s)", self.store.name, exc
            )
        self._lock.release()
        self.active = False
        self.logger.info("database %s: runner stopped", self.store.name)

    # -- the active loop ----------------------------------------------------------------------
    def _serve(self, connection: StoreConnection) -> None:
        self.logger.info("database %s: active runner (%s)", self.store.name, self.runner.name)
        desired = self._reconcile(connection)
        self.logger.info(
            "database %s: serving %d broker(s), service %s",
            self.store.name,
            len(self.workers),
            "running" if desired.running else "stopped",
        )
        last_read = last_beat = 0.0
        # Serving again: an outage of the database that is over is history (in the log), not
        # a current error of this runner.
        self.last_error = None
        self._heartbeat(connection)
        self._served = True
        while not self._stop_event.is_set():
            now = time.monotonic()
            timeout = min(
                self.runner.heartbeat - (now - last_beat), self._poll_interval - (now - last_read)
            )
            payloads = self._lock.wait(max(0.0, timeout))
            now = time.monotonic()
            reload = now - last_read >= self._poll_interval
            for payload in payloads:
                if payload == "outbox":
                    for worker in self.workers.values():
                        worker.pipeline.wake_outbox()
                elif payload == "restart":
                    self._restart.update(self.workers)
                    reload = True
                elif payload.startswith("restart:"):
                    self._restart.add(int(payload.partition(":")[2] or 0))
                    reload = True
                else:
                    reload = True
            if reload:
                self._reconcile(connection)
                last_read = now
            if now - last_beat >= self.runner.heartbeat:
                if not self._lock.alive():
                    raise LockLost("the runner lock's database connection was lost")
                self._heartbeat(connection)
                last_beat = now

    def _reconcile(self, connection: StoreConnection) -> DesiredState:
        desired = connection.load_desired()
        wanted = {b.id: b for b in desired.brokers} if desired.running else {}
        for broker_id in list(self.workers):
            worker = self.workers[broker_id]
            config = wanted.get(broker_id)
            if config is None or config != worker.broker or broker_id in self._restart:
                reason = "removed or stopped" if config is None else "settings changed"
                if broker_id in self._restart:
                    reason = "restart asked"
                self.logger.info(
                    "database %s: broker %r: disconnecting (%s)",
                    self.store.name,
                    worker.broker.name,
                    reason,
                )
                worker.stop()
                del self.workers[broker_id]
        self._restart.clear()
        for broker_id, config in wanted.items():
            worker = self.workers.get(broker_id)
            if worker is None:
                worker = BrokerWorker(
                    self.store,
                    config,
                    self.runner.session_factory,
                    self.runner.on_stored,
                    self.logger,
                    self.runner.pipeline_options,
                )
                worker.apply(desired.subscriptions_of(broker_id))
                worker.start()
                self.workers[broker_id] = worker
                self.logger.info(
                    "database %s: broker %r (%s:%s): connecting, %d subscription(s)",
                    self.store.name,
                    config.name,
                    config.host,
                    config.port,
                    len(worker.subscriptions),
                )
            else:
                worker.apply(desired.subscriptions_of(broker_id))
        return desired

    def _heartbeat(self, connection: StoreConnection) -> None:
        queued = connection.count_queued()
        states = [w.state_row(queued.get(b, 0)) for b, w in self.workers.items()]
        stopped_ids = self._stopped_broker_ids(connection)
        now = utcnow()
        for broker_id in stopped_ids:
            states.append(
                {"broker_id": broker_id, "state": STOPPED, "state_since": now, "updated_at": now}
            )
        connection.write_broker_states(states)
        connection.clear_broker_states([*self.workers, *stopped_ids])
        connection.write_runner(self._runner_row("active"))
        connection.claim_active(self.runner.name)
        stale = utc_from_timestamp(time.time() - max(60.0, 10 * self.runner.heartbeat))
        connection.delete_runner("", stale_before=stale)
        for broker_id, worker in self.workers.items():
            if queued.get(broker_id) and worker.session.status.state == CONNECTED:
                worker.pipeline.wake_outbox()

    def _stopped_broker_ids(self, connection: StoreConnection) -> list[int]:
        """Brokers that exist but are not served (disabled, or the service stopped)."""
        return [b for b in connection.active_broker_ids() if b not in self.workers]

    def _write_standby(self) -> None:
        try:
            connection = self.store.connect()
            try:
                connection.write_runner(self._runner_row("standby"))
            finally:
                connection.close()
        except Exception as exc:
            self.logger.debug("database %s: standby heartbeat failed: %s", self.store.name, exc)

    def _runner_row(self, role: str) -> dict:
        return {
            "name": self.runner.name,
            "host": self.runner.host,
            "pid": os.getpid(),
            "mode": self.runner.mode,
            "role": role,
            "version": __version__,
            "started_at": self.started_at,
            "heartbeat_at": utcnow(),
            "last_error": self.last_error,
        }

    def _stop_workers(self) -> None:
        for worker in self.workers.values():
            try:
                worker.stop()
            except Exception:
                self.logger.exception("database %s: stopping a broker failed", self.store.name)
        self.workers.clear()


class Runner:
    """Serves databases until stopped; see the module docstring."""

    def __init__(
        self,
        stores: list[Store] | None = None,
        *,
        mode: str = "engine",
        session_factory: SessionFactory = default_session_factory,
        on_stored: OnStored | None = None,
        heartbeat: float = 5.0,
        lock_retry: float = 2.0,
        poll_interval: float = 30.0,
        pipeline_options: dict | None = None,
        logger: logging.Logger | None = None,
    ):
        self.mode = mode
        self.session_factory = session_factory
        self.on_stored = on_stored
        self.heartbeat = heartbeat
        self.lock_retry = lock_retry
        self.poll_interval = poll_interval
        self.pipeline_options = pipeline_options
        self.logger = logger or _logger
        self.host = socket.gethostname()
        self.name = f"{self.host}:{os.getpid()}"
        self.databases: dict[str, DatabaseRunner] = {}
        self._guard = threading.Lock()
        self._pending = list(stores or [])

    def start(self) -> None:
        """Start serving the stores given at construction."""
        for store in self._pending:
            self.serve(store)
        self._pending = []

    def serve(self, store: Store) -> None:
        """Start serving one more database (no effect if served already)."""
        with self._guard:
            if store.name in self.databases:
                return
            thread = DatabaseRunner(self, store)
            self.databases[store.name] = thread
            thread.start()

    def forget(self, name: str, timeout: float = 15.0) -> None:
        """Stop serving one database."""
        with self._guard:
            thread = self.databases.pop(name, None)
        if thread is not None:
            thread.stop()
            thread.join(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop everything: sessions disconnect, the locks are released."""
        with self._guard:
            threads = list(self.databases.values())
            self.databases.clear()
        for thread in threads:
            thread.stop()
        for thread in threads:
            thread.join(timeout)

    def is_active(self, name: str) -> bool:
        thread = self.databases.get(name)
        return bool(thread and thread.active)


def tune_garbage_collector() -> None:
    """For a process whose job is the runner: collect cycles less often, never rescan startup.

    Per message the engine makes a few short-lived containers, which reference counting frees;
    CPython's default first-generation threshold (700 allocations) still runs a cycle collection
    every hundred messages or so, and every full collection rescans everything the process
    loaded at startup: in a process that has loaded Odoo, pauses of 80-130 ms, which made the
    tail of the publish-to-commit latency. Startup objects are frozen (never scanned again) and
    collections come less often. Measured: the standalone engine spent 0.36 s in 1,350
    collections on a 100,000-message flood by default, 0.15-0.20 s so; ``odoo-bin mqtt bench``
    had p99 62-511 ms at 2,000 msg/s before, 29-33 ms after. Called by ``mqtt-engine run``,
    ``odoo-bin mqtt`` and the prefork server's runner worker; never in a threaded Odoo server,
    whose process serves requests too.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)
