"""The supervisor: finds the databases where mqtt_listener is installed and keeps them served.

One supervisor per process that runs the listener (the threaded server, the prefork server's
dedicated MQTT worker, or ``odoo-bin mqtt``). It owns one engine :class:`~mqtt_engine.runner.Runner`
and, every ``scan_interval`` seconds (30) or when woken, lists the candidate databases
(``db_name`` from the configuration, else every database of the Odoo role), keeps those where
the addon is *installed* (``ir_module_module``; a database being installed, upgraded or
uninstalled is skipped, as ``ir_cron`` does) and tells the runner to serve them. The runner then
takes each database's advisory lock, so however many supervisors run (prefork, several nodes, a
standalone command beside a server), exactly one listens per database and the others stand by.

It reaches PostgreSQL with Odoo's own connection settings (``db_host``, ``db_port``,
``db_user``, ``db_password``, ``db_sslmode``) but through its own psycopg2 connections, never
from Odoo's cursor pool, so it never competes with requests for a cursor.
"""

from __future__ import annotations

import logging
import threading

import psycopg2
from psycopg2.extensions import make_dsn

from mqtt_engine.runner import Runner
from mqtt_engine.store_pg import KEEPALIVES, PostgresStore

from odoo import sql_db
from odoo.service import db as db_service
from odoo.tools import config

_logger = logging.getLogger("odoo.addons.mqtt_listener")
runner_logger = logging.getLogger("odoo.addons.mqtt_listener.runner")

SCAN_INTERVAL = 30.0


def configured_databases() -> list[str]:
    """``db_name`` of the configuration as a list (a string in 17/18, a list in 19)."""
    value = config.get("db_name") or []
    if isinstance(value, str):
        value = value.split(",")
    return [name.strip() for name in value if name and name.strip()]


def database_dsn(dbname: str) -> str:
    """A libpq DSN for ``dbname`` from Odoo's own connection settings."""
    _name, info = sql_db.connection_info_for(dbname)
    info = dict(info)
    info["application_name"] = "odoo-mqtt_listener"
    if "dsn" in info:
        return make_dsn(info.pop("dsn"), **info)
    return make_dsn(**{("dbname" if k == "database" else k): v for k, v in info.items()})


def addon_state(dbname: str) -> str | None:
    """The state of mqtt_listener in ``dbname`` (``installed``, ``to install`` …) or None."""
    try:
        connection = psycopg2.connect(database_dsn(dbname), connect_timeout=10, **KEEPALIVES)
    except psycopg2.Error as exc:
        _logger.debug("database %s: cannot connect (%s)", dbname, exc)
        return None
    try:
        with connection.cursor() as cr:
            cr.execute("SELECT to_regclass('ir_module_module') IS NOT NULL")
            if not cr.fetchone()[0]:
                return None
            cr.execute("SELECT state FROM ir_module_module WHERE name = 'mqtt_listener'")
            row = cr.fetchone()
            return row[0] if row else None
    except psycopg2.Error:
        return None
    finally:
        connection.close()


def addon_installed(dbname: str) -> bool:
    """Whether mqtt_listener is installed (and not being changed) in ``dbname``."""
    return addon_state(dbname) == "installed"


class Supervisor:
    """Serves every database where the addon is installed; see the module docstring."""

    def __init__(self, mode: str, databases: list[str] | None = None, scan_interval=SCAN_INTERVAL):
        self.mode = mode
        self.databases = databases
        self.scan_interval = scan_interval
        self.runner = Runner(mode=mode, logger=runner_logger)
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def candidates(self) -> list[str]:
        if self.databases:
            return list(self.databases)
        return configured_databases() or db_service.list_dbs(True)

    def scan(self) -> bool:
        """Serve the databases that have the addon, forget those that lost it.

        Returns whether a database is in the middle of installing or upgrading the addon: its
        install commits the post_init hook before the module is marked installed, so the
        supervisor looks again every second until it is.
        """
        states = {name: addon_state(name) for name in self.candidates()}
        wanted = {name for name, state in states.items() if state == "installed"}
        served = set(self.runner.databases)
        for name in sorted(wanted - served):
            _logger.info("MQTT service: serving database %s (%s)", name, self.mode)
            self.runner.serve(PostgresStore(database_dsn(name), name=name))
        for name in sorted(served - wanted):
            _logger.info("MQTT service: database %s no longer has mqtt_listener installed", name)
            self.runner.forget(name)
        return any(state in ("to install", "to upgrade") for state in states.values())

    def wake(self) -> None:
        """Scan now (after an install or uninstall in this process)."""
        self._wake.set()

    def run(self) -> None:
        """Scan and serve until :meth:`stop`; never dies of an exception."""
        _logger.info("MQTT service: supervisor started (%s)", self.mode)
        while not self._stopped.is_set():
            changing = False
            try:
                changing = self.scan()
            except Exception:
                _logger.exception("MQTT service: scanning the databases failed")
            self._wake.wait(1.0 if changing else self.scan_interval)
            self._wake.clear()
        self.runner.stop()
        _logger.info("MQTT service: supervisor stopped (%s)", self.mode)

    def start_thread(self) -> None:
        self._thread = threading.Thread(target=self.run, name="mqtt-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
