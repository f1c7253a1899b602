"""Where the listener runs, checked on a real Odoo: threaded, prefork, standalone, standby.

Called by ``odoo_tests.py`` on the database where the addon was just installed and tested. Each
check starts a real Odoo process the way an operator would, and watches the ``mqtt_runner``
table (what the UI shows) for the runner it must produce:

- threaded (``odoo-bin -d db``): one active runner of mode ``threaded``; a clean SIGTERM removes
  its row;
- prefork (``--workers 2`` with the addon server-wide): one active runner of mode ``prefork``,
  in a process that is neither the master nor an HTTP worker; killed with SIGKILL, the master
  spawns a new one and it takes over;
- standalone (``odoo-bin mqtt -d db``) beside the threaded server: it stands by while the
  server's runner holds the database's lock, takes over when the server stops, and exits 0 on
  SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psycopg2


class Problem(AssertionError):
    pass


def _runners(dsn: str) -> list[tuple]:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cr:
        cr.execute(
            "SELECT pid, mode, role FROM mqtt_runner "
            "WHERE heartbeat_at > (now() AT TIME ZONE 'UTC') - interval '20 seconds' "
            "ORDER BY role, pid"
        )
        rows = cr.fetchall()
    connection.close()
    return rows


def _wait(predicate, timeout: float, what: str, log_of=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    tail = ""
    if log_of is not None:
        tail = "\n" + "\n".join(log_of().splitlines()[-30:])
    raise Problem(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


class OdooProcess:
    """An Odoo server or command, its output in a file."""

    def __init__(self, command: list[str], log_path: str):
        self.log_path = log_path
        self.handle = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.handle.close()
        return self.process.returncode


def _active(dsn: str, mode: str):
    def check():
        rows = [r for r in _runners(dsn) if r[2] == "active"]
        return rows if len(rows) == 1 and rows[0][1] == mode else None

    return check


def check_threaded_and_standalone(server_command, mqtt_command, dsn: str, directory: str):
    server = OdooProcess(server_command(), os.path.join(directory, "threaded.log"))
    standalone = None
    try:
        ((pid, _mode, _role),) = _wait(
            _active(dsn, "threaded"), 90, "a threaded runner", server.log
        )
        if pid != server.process.pid:
            raise Problem(f"the threaded runner runs in pid {pid}, not the server's")
        standalone = OdooProcess(mqtt_command(), os.path.join(directory, "standalone.log"))
        _wait(
            lambda: any(r[1] == "standalone" and r[2] == "standby" for r in _runners(dsn)),
            60,
            "the standalone runner standing by",
            standalone.log,
        )
        if server.stop() != 0:
            raise Problem(f"the threaded server exited with {server.process.returncode}")
        _wait(_active(dsn, "standalone"), 30, "the standalone runner to take over", standalone.log)
    finally:
        server.stop()
        if standalone is not None:
            code = standalone.stop()
            if code != 0:
                raise Problem(f"odoo-bin mqtt exited with {code} on SIGTERM")
    print("   threaded server: one active runner; standalone command: standby, then takes over")


def check_prefork(prefork_command, dsn: str, directory: str):
    server = OdooProcess(prefork_command(), os.path.join(directory, "prefork.log"))
    try:
        ((pid, _mode, _role),) = _wait(
            _active(dsn, "prefork"), 90, "a prefork runner worker", server.log
        )
        if pid == server.process.pid:
            raise Problem("the prefork runner runs in the master process")
        # Over two heartbeats: still exactly one active runner, the same process.
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            rows = [r for r in _runners(dsn) if r[2] == "active"]
            if [r[0] for r in rows] != [pid]:
                raise Problem(f"expected one active prefork runner {pid}, got {rows}")
            time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        _wait(
            lambda: (r := _active(dsn, "prefork")()) and r[0][0] != pid,
            60,
            "the master to respawn the runner worker",
            server.log,
        )
    finally:
        server.stop()
    print("   prefork server: one dedicated runner worker, respawned after SIGKILL")


def check_topologies(server_command, prefork_command, mqtt_command, dsn, directory) -> list[str]:
    """Run every check; returns the problems found (empty: all good)."""
    problems = []
    for check in (
        lambda: check_threaded_and_standalone(server_command, mqtt_command, dsn, directory),
        lambda: check_prefork(prefork_command, dsn, directory),
    ):
        try:
            check()
        except (Problem, psycopg2.Error, OSError) as exc:
            problems.append(f"(topology) {exc}")
    return problems
