"""Run the mqtt_listener addon's tests in a real Odoo 18, on a fresh database.

Called by ``scripts/test`` with Odoo's own Python. Installs the addon on a new database with
``--test-enable --test-tags /mqtt_listener``, then upgrades it (``-u``) once more, and prints
the totals as ``N passed, N failed``. Fails when a test fails, when no test ran, or when Odoo
logged an ERROR or a traceback. The database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import uuid

TOTALS = re.compile(r"(\d+) failed, (\d+) error\(s\) of (\d+) tests")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_settings() -> dict[str, str]:
    dsn = os.environ.get("MQTT_TEST_PG", "host=127.0.0.1 port=5432 user=root")
    settings = dict(part.split("=", 1) for part in dsn.split())
    return {
        "host": settings.get("host", "127.0.0.1"),
        "port": settings.get("port", "5432"),
        "user": settings.get("user", "root"),
    }


def odoo_command(args: argparse.Namespace, database: str, *command: str) -> list[str]:
    """``odoo-bin [command] --addons-path=… --db_*=… -d database``."""
    pg = pg_settings()
    return [
        sys.executable,
        os.path.join(args.odoo_src, "odoo-bin"),
        *command,
        f"--addons-path={os.path.join(args.odoo_src, 'addons')},{args.addons}",
        f"--db_host={pg['host']}",
        f"--db_port={pg['port']}",
        f"--db_user={pg['user']}",
        "-d",
        database,
    ]


def odoo(args: argparse.Namespace, database: str, *extra: str) -> tuple[int, str]:
    command = [
        *odoo_command(args, database),
        f"--http-port={free_port()}",
        "--stop-after-init",
        "--without-demo=all",
        *extra,
    ]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    log = result.stdout + result.stderr
    print(
        f"   odoo {' '.join(extra)}: exit {result.returncode} in {time.monotonic() - started:.0f}s"
    )
    return result.returncode, log


UNINSTALL = """
module = env["ir.module.module"].search([("name", "=", "mqtt_listener")])
module.button_immediate_uninstall()
env.cr.execute("SELECT to_regclass('mqtt_publish_signal_history') IS NULL")
assert env.cr.fetchone()[0], "the history table survived the uninstall"
print("UNINSTALLED", module.state)
"""


def uninstall(args: argparse.Namespace, database: str) -> tuple[int, str]:
    """Uninstall the addon through the ORM (as the Apps menu does) in ``odoo-bin shell``."""
    command = [*odoo_command(args, database, "shell"), "--no-http"]
    result = subprocess.run(command, input=UNINSTALL, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    code = result.returncode if "UNINSTALLED uninstalled" in log else 1
    print(f"   odoo shell (uninstall): {'ok' if code == 0 else 'FAILED'}")
    return code, log


def topologies(args: argparse.Namespace, database: str) -> list[str]:
    """The threaded, prefork and standalone runners on ``database`` (odoo_topologies.py)."""
    import tempfile

    from odoo_topologies import check_topologies

    pg = pg_settings()
    dsn = f"host={pg['host']} port={pg['port']} user={pg['user']} dbname={database}"

    def server(*extra: str) -> list[str]:
        return [*odoo_command(args, database), f"--http-port={free_port()}", *extra]

    def mqtt() -> list[str]:
        # --addons-path=… must come first for Odoo to find the addon's command
        command = odoo_command(args, database)
        return [*command[:3], "mqtt", *command[3:]]

    print("   topologies:")
    with tempfile.TemporaryDirectory(prefix="mqtt-topologies-") as directory:
        return check_topologies(
            server,
            lambda: server("--workers=2", "--max-cron-threads=1", "--load=base,web,mqtt_listener"),
            mqtt,
            dsn,
            directory,
        )


def problems(log: str) -> list[str]:
    lines = log.splitlines()
    found = []
    for index, line in enumerate(lines):
        if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
            found.append("\n".join(lines[index : index + 25]))
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--odoo-src", required=True)
    parser.add_argument("--addons", required=True, help="the folder that holds mqtt_listener")
    args = parser.parse_args()
    database = f"mqtt_listener_test_{uuid.uuid4().hex[:8]}"
    pg = pg_settings()
    dropdb = ["dropdb", "-h", pg["host"], "-p", pg["port"], "-U", pg["user"], "--if-exists"]
    print(f"==> Odoo tests of mqtt_listener on a fresh database {database}")
    try:
        code, log = odoo(
            args,
            database,
            "-i",
            "mqtt_listener",
            "--test-enable",
            "--test-tags",
            "/mqtt_listener",
            "--log-level=info",
        )
        totals = TOTALS.findall(log)
        failed = errors = ran = 0
        for f, e, n in totals:
            failed, errors, ran = failed + int(f), errors + int(e), ran + int(n)
        trouble = problems(log)
        if not code:
            trouble += topologies(args, database)
        upgrade_code, upgrade_log = odoo(args, database, "-u", "mqtt_listener")
        trouble += [f"(upgrade) {p}" for p in problems(upgrade_log)]
        uninstall_code, uninstall_log = uninstall(args, database)
        trouble += [f"(uninstall) {p}" for p in problems(uninstall_log)]
        upgrade_code = upgrade_code or uninstall_code
    finally:
        subprocess.run([*dropdb, database], check=False)
    for block in trouble:
        print(block, end="\n---\n")
    print(f"{ran - failed - errors} passed, {failed + errors} failed")
    if ran == 0:
        print("FAILED: no Odoo test ran (the test count must be above zero)")
        print("\n".join(log.splitlines()[-40:]))
        return 1
    if failed or errors or code or upgrade_code or trouble:
        print("FAILED: see the Odoo log lines above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
