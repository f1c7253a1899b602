"""The command line as an operator uses it: ``run``, ``check``, and their error messages."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_engine.payload import from_column
from tests.support import wait_for

pytestmark = pytest.mark.timeout(120)


def engine(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mqtt_engine", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_check_reports_every_step_on_a_working_broker(broker_address, unique_topic):
    host, port = broker_address
    result = engine("check", "--host", host, "--port", str(port), "--topic", f"{unique_topic}/#")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for step in ("DNS", "TCP", "MQTT", "subscribe"):
        assert any(line.startswith(f"ok   {step}:") for line in lines), result.stdout
    assert "max_queued_messages" in result.stdout  # the warning about settings that lose data
    assert lines[-1] == "all checks passed"


def test_check_names_the_failing_step():
    closed = engine("check", "--host", "127.0.0.1", "--port", "1", "--timeout", "3")
    assert closed.returncode == 1
    assert "FAIL TCP: cannot connect to 127.0.0.1:1" in closed.stdout
    unknown = engine("check", "--host", "no-such-host.invalid", "--timeout", "3")
    assert unknown.returncode == 1
    assert "FAIL DNS: cannot resolve 'no-such-host.invalid'" in unknown.stdout


def test_check_tls_verifies_the_certificate(mosquitto_factory, tmp_path):
    server = mosquitto_factory(tls=True)
    untrusted = engine(
        "check", "--host", "127.0.0.1", "--port", str(server.tls_port), "--tls", "--timeout", "5"
    )
    assert untrusted.returncode == 1
    assert "FAIL TLS: certificate rejected" in untrusted.stdout
    ca = tmp_path / "ca.pem"
    ca.write_text(server.ca_pem)
    trusted = engine(
        "check", "--host", "127.0.0.1", "--port", str(server.tls_port), "--tls",
        "--ca-file", str(ca), "--timeout", "5",
    )  # fmt: skip
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    assert "certificate verified" in trusted.stdout


def test_check_reports_a_wrong_password_without_showing_it(mosquitto_factory):
    server = mosquitto_factory(users={"odoo": "right-secret"})
    result = engine(
        "check", "--host", "127.0.0.1", "--port", str(server.port), "--username", "odoo",
        "--password-env", "PW", "--timeout", "5",
        env={"PW": "wrong-secret-123"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "FAIL MQTT:" in result.stdout
    assert "authentication failed" in result.stdout.lower()
    assert "wrong-secret-123" not in result.stdout + result.stderr


def test_run_stores_messages_and_stops_on_sigterm(broker_address, unique_topic, tmp_path):
    host, port = broker_address
    database = tmp_path / "run.sqlite3"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mqtt_engine", "run", "--database", f"sqlite:///{database}",
            "--host", host, "--port", str(port), "--topic", f"{unique_topic}/#",
            "--heartbeat", "0.5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:

        def connected():
            if not database.exists():
                return False
            try:
                with sqlite3.connect(database) as db:
                    row = db.execute("SELECT state, subscribed FROM mqtt_broker_state").fetchone()
            except sqlite3.Error:
                return False
            return row and row[0] == "connected" and unique_topic in (row[1] or "")

        wait_for(connected, 20, "the standalone listener to subscribe")
        client = mqtt.Client(CallbackAPIVersion.VERSION2)
        client.connect(host, port)
        client.loop_start()
        client.publish(f"{unique_topic}/a", b"from the cli", qos=1).wait_for_publish(10)
        client.disconnect()
        client.loop_stop()

        def stored():
            with sqlite3.connect(database) as db:
                return db.execute("SELECT payload FROM mqtt_publish_signal_history").fetchall()

        rows = wait_for(stored, 20, "the message in SQLite")
        assert from_column(rows[0][0]) == b"from the cli"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "signal SIGTERM: stopping" in output
    assert "runner stopped" in output


def test_run_refuses_a_bad_configuration_plainly(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        '[[broker]]\nname = "plant"\nhost = "127.0.0.1"\n'
        '[[broker.subscription]]\ntopic_filter = "a/#/b"\n'
    )
    result = engine("run", "--config", str(config), "--database", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.returncode == 2
    assert "broker 'plant', subscription #1" in result.stderr
    assert "'#'" in result.stderr


@pytest.mark.timeout(300)
def test_bench_reports_every_figure_and_loses_nothing(pg_admin_dsn):
    """A small benchmark run: every figure present, nothing lost or doubled (no timing judged)."""
    result = engine(
        "bench",
        "--messages", "3000",
        "--baseline-messages", "200",
        "--rate", "500",
        "--seconds", "1",
        "--rounds", "2",
        "--pg", pg_admin_dsn,
        "--json",
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["rounds"] == 2 and len(figures["per_round"]) == 2
    for key in ("ceiling_msgs_per_s", "engine_msgs_per_s", "baseline_msgs_per_s", "peak_rss_mb"):
        assert figures[key] > 0, key
    assert figures["p50_ms"] is not None and figures["p99_ms"] is not None
    assert figures["lost"] == 0 and figures["duplicates"] == 0
    assert "median of 2 round(s)" in result.stdout
