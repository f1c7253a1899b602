"""A throwaway PostgreSQL cluster for fault tests: restart it, stop it, crash it.

``PgCluster()`` runs ``initdb -U root --auth=trust`` in a fresh temporary directory and
:meth:`~PgCluster.start` runs ``pg_ctl start`` on a free 127.0.0.1 port, with the Unix socket
in that directory too (``-k``), so it never touches the machine's own server. PostgreSQL
refuses to run as root, so when the tests run as root the cluster belongs to the ``postgres``
system user (the directory is handed over to it); the superuser role is ``root`` either way.

- :meth:`restart` stops (``-m fast``: sessions are terminated, a checkpoint is written) and
  starts again on the same port;
- :meth:`stop` with ``mode="immediate"`` is an emergency stop (no checkpoint, crash recovery at
  the next start); :meth:`kill` is a real crash: SIGKILL to the postmaster and every backend;
- :meth:`cleanup` stops whatever runs and removes the directory.

``fsync`` is off: a killed *process* loses nothing the kernel already has (the page cache
survives it), and the tests crash processes, not the machine. Every wait has a deadline;
failures carry the tail of the server log.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import psutil

from tests.support import LogFile

PG_BIN = pathlib.Path(
    os.environ.get("MQTT_TEST_PG_BIN")
    or next(
        iter(sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)),
        pathlib.Path("/usr/lib/postgresql/15/bin"),
    )
)
TIMEOUT = 30


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgCluster(LogFile):
    """One initdb'ed cluster in its own temporary directory; see the module docstring."""

    def __init__(self, database: str = "mqtt_engine"):
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="mqtt-engine-pg-"))
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.port = free_port()
        self.database = database
        self._owner = None
        if os.geteuid() == 0:
            self._owner = pwd.getpwnam("postgres")
            os.chown(self.directory, self._owner.pw_uid, self._owner.pw_gid)
        self._initialized = False

    def __repr__(self) -> str:
        return f"<PgCluster port={self.port} {self.directory}>"

    @property
    def dsn(self) -> str:
        """DSN of the test database (created by the first :meth:`start`)."""
        return f"host=127.0.0.1 port={self.port} user=root dbname={self.database}"

    @property
    def admin_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=root dbname=postgres"

    # ------------------------------------------------------------------ commands

    def _run(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
        kwargs = {}
        if self._owner is not None:
            kwargs = {
                "user": self._owner.pw_uid,
                "group": self._owner.pw_gid,
                "extra_groups": [],
                "env": {**os.environ, "HOME": self._owner.pw_dir, "USER": "postgres"},
            }
        result = subprocess.run(
            args,
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
            **kwargs,
        )
        return result

    def _check(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode:
            raise RuntimeError(
                f"{what} failed ({result.returncode}): {result.stderr.strip()}\n"
                f"--- server log tail ---\n{self.log_tail()}"
            )

    def init(self) -> None:
        result = self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "root",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._check(result, "initdb")
        self._initialized = True

    def start(self) -> PgCluster:
        """Start (initdb first if needed) and wait until it accepts connections."""
        if not self._initialized:
            self.init()
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c max_connections=50 -c shared_buffers=32MB"
        )
        result = self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "-t",
            str(TIMEOUT),
            "start",
            timeout=TIMEOUT + 5,
        )
        self._check(result, "pg_ctl start")
        self._ensure_database()
        return self

    def _ensure_database(self) -> None:
        import psycopg2

        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                connection = psycopg2.connect(self.admin_dsn, connect_timeout=3)
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        try:
            connection.autocommit = True
            with connection.cursor() as cr:
                cr.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if not cr.fetchone():
                    cr.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            connection.close()

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>`` (smart, fast or immediate) and wait for it."""
        if not self.running:
            return
        result = self._run(
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            mode,
            "-w",
            "-t",
            str(TIMEOUT),
            "stop",
            timeout=TIMEOUT + 5,
        )
        self._check(result, f"pg_ctl stop -m {mode}")

    def restart(self, mode: str = "fast") -> None:
        """Stop and start again on the same port."""
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """A crash: SIGKILL to the postmaster and all its processes, and wait until gone."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            postmaster = psutil.Process(pid)
            processes = [postmaster, *postmaster.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(processes, timeout=TIMEOUT)
        if alive:
            raise RuntimeError(f"PostgreSQL processes survived SIGKILL: {alive}")

    def cleanup(self) -> None:
        """Stop whatever still runs (immediately) and remove the directory."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        with contextlib.suppress(Exception):
            self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ state

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid``, if that process runs."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if psutil.pid_exists(pid) else None

    @property
    def running(self) -> bool:
        return self.postmaster_pid() is not None
