"""Where the MQTT listener runs inside an Odoo server. An operator's runbook.

The listener (the engine's runner, driven by :mod:`.supervisor`) must run exactly once per
database, whatever the topology. This module is the only one that knows about Odoo's server
classes; it is set up by the addon's ``post_load`` hook (``_auto_start_mqtt``).

Threaded server (``odoo-bin`` without ``--workers``)
    A ``mqtt-supervisor`` thread in the server process. Nothing to configure: it starts as soon
    as the addon's code is loaded in the process (at start with ``-d``/``db_name`` or with
    ``server_wide_modules``; otherwise when a database with the addon is first opened), then
    finds *every* database where the addon is installed. After a restart it resumes by itself.

Prefork server (``--workers N``)
    A dedicated worker process, ``odoo: MqttRunnerWorker``, spawned and respawned by the master
    like the HTTP and cron workers (the OCA queue_job pattern). The master must load the addon
    before it forks: put it in the server-wide modules::

        server_wide_modules = base,web,mqtt_listener

    (or preload the database with ``-d``). HTTP and cron workers never run a listener. Without
    either, no runner is attached: the MQTT service form says so, and ``odoo-bin mqtt`` (below)
    is the alternative.

Standalone (``odoo-bin --addons-path=… mqtt -c odoo.conf [-d db]``)
    The listener as its own process or container, e.g. beside servers that run none.

Several nodes
    Run it wherever convenient, even everywhere: each database's advisory lock makes one
    runner active; the others stand by and take over within seconds when it dies.

It never runs under ``--stop-after-init``, in the gevent (longpolling) process, in ``odoo-bin
shell``, or when tests are enabled (tests start a runner themselves when they need one). Set
``mqtt_listener_runner = False`` in ``[options]`` of odoo.conf, or the environment variable
``MQTT_LISTENER_RUNNER=0``, to keep a server from running one (for example on nodes that leave
it to ``odoo-bin mqtt``).

Log lines to expect (logger ``odoo.addons.mqtt_listener``)::

    MQTT service: supervisor started (threaded)
    MQTT service: serving database erp (threaded)
    database erp: active runner (host:1234)            (or: standing by, another runner ...)
    database erp: broker 'plant' (10.0.0.5:1883): connecting, 3 subscription(s)
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading

import odoo
from odoo.service import server as odoo_server
from odoo.tools import config

_logger = logging.getLogger("odoo.addons.mqtt_listener")

_lock = threading.Lock()
_installed = False
_supervisor = None  # the Supervisor of this process, when it runs one


def runner_enabled() -> bool:
    """Whether this process may run a listener at all (see the module docstring)."""
    if os.environ.get("MQTT_LISTENER_RUNNER", "1").lower() in ("0", "false", "no", "off"):
        return False
    if str(config.get("mqtt_listener_runner", True)).lower() in ("0", "false", "no", "off"):
        return False
    if config.get("stop_after_init") or config.get("test_enable") or config.get("test_file"):
        return False
    return not getattr(odoo, "evented", False)


def current_supervisor():
    return _supervisor


def start_supervisor(mode: str, databases: list[str] | None = None):
    """Start this process's supervisor thread (once); returns it."""
    global _supervisor
    from .supervisor import Supervisor

    with _lock:
        if _supervisor is None:
            _supervisor = Supervisor(mode, databases)
            _supervisor.start_thread()
        return _supervisor


def stop_supervisor() -> None:
    global _supervisor
    with _lock:
        supervisor, _supervisor = _supervisor, None
    if supervisor is not None:
        supervisor.stop()


def wake_supervisor() -> None:
    """Make this process's supervisor rescan now (no effect where none runs)."""
    if _supervisor is not None:
        _supervisor.wake()


class MqttRunnerWorker(odoo_server.Worker):
    """The prefork server's dedicated listener process."""

    def __init__(self, multi):
        super().__init__(multi)
        self.watchdog_timeout = None  # the listener's loop is long-lived by design
        self.supervisor = None

    def sleep(self):
        # Never wait on the HTTP socket: this worker accepts no requests.
        with contextlib.suppress(InterruptedError):  # a signal: the loop checks self.alive
            select.select([self.wakeup_fd_r], [], [], self.multi.beat)
            odoo_server.empty_pipe(self.wakeup_fd_r)

    def signal_handler(self, sig, frame):
        result = super().signal_handler(sig, frame)
        if self.supervisor is not None:
            self.supervisor.stop(timeout=0)
        return result

    def process_work(self):
        if self.supervisor is None:
            from mqtt_engine.runner import tune_garbage_collector

            from .supervisor import Supervisor

            tune_garbage_collector()  # this process serves the runner alone
            self.supervisor = Supervisor("prefork")
            self.supervisor.start_thread()

    def stop(self):
        if self.supervisor is not None:
            self.supervisor.stop()
        return super().stop()


def _prefork_process_spawn(self):
    _original["process_spawn"](self)
    workers = self.__dict__.setdefault("mqtt_runner_workers", {})
    if not workers and runner_enabled():
        self.worker_spawn(MqttRunnerWorker, workers)


def _prefork_worker_pop(self, pid):
    result = _original["worker_pop"](self, pid)
    self.__dict__.get("mqtt_runner_workers", {}).pop(pid, None)
    return result


def _threaded_start(self, stop=False):
    result = _original["start"](self, stop=stop)
    # stop=True: a server that stops at once (odoo-bin shell, --stop-after-init): no listener.
    if not stop and runner_enabled():
        _logger.info("MQTT service: starting the listener in the threaded server")
        start_supervisor("threaded")
    return result


_original: dict = {}


def install_server_integration() -> None:
    """Hook the listener into Odoo's server (idempotent); the post_load hook calls it."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        _original["process_spawn"] = odoo_server.PreforkServer.process_spawn
        _original["worker_pop"] = odoo_server.PreforkServer.worker_pop
        _original["start"] = odoo_server.ThreadedServer.start
        odoo_server.PreforkServer.process_spawn = _prefork_process_spawn
        odoo_server.PreforkServer.worker_pop = _prefork_worker_pop
        odoo_server.ThreadedServer.start = _threaded_start
        odoo_server.CommonServer.on_stop(stop_supervisor)
    # Loaded late (not server-wide): the threaded server already serves, so start now. A
    # server without its HTTP thread is odoo-bin shell's, started with stop=True: none there.
    current = odoo_server.server
    serving = isinstance(current, odoo_server.ThreadedServer) and getattr(current, "httpd", None)
    if serving and runner_enabled():
        _logger.info("MQTT service: starting the listener in the threaded server")
        start_supervisor("threaded")
