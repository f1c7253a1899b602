"""Shared fixtures: the real broker, a fresh PostgreSQL database per test, unique topics.

The machine's mosquitto (127.0.0.1:1883) and PostgreSQL (127.0.0.1:5432) are used when they
answer; otherwise the test command (``.ci/run`` via ``scripts/test``) starts throwaway ones and
exports ``MQTT_TEST_BROKER`` / ``MQTT_TEST_PG``. Tests that need special broker settings start
their own mosquitto through ``mosquitto_factory``.
"""

from __future__ import annotations

import os
import re
import uuid

import pytest

from mqtt_engine.runner import Runner
from tests.mosquitto import Mosquitto

RUN_ID = uuid.uuid4().hex[:8]


def _host_port(value: str, default_port: int) -> tuple[str, int]:
    host, _, port = value.partition(":")
    return host or "127.0.0.1", int(port or default_port)


@pytest.fixture(scope="session")
def broker_address() -> tuple[str, int]:
    """(host, port) of the shared plain broker."""
    return _host_port(os.environ.get("MQTT_TEST_BROKER", "127.0.0.1:1883"), 1883)


@pytest.fixture
def unique_topic(request) -> str:
    """A topic prefix no other test (or earlier run) uses: retained messages never leak."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", request.node.name)[:60]
    return f"mqtt-engine-test/{RUN_ID}/{name}"


@pytest.fixture
def mosquitto_factory(tmp_path):
    """Start mosquitto processes with special settings; all are killed after the test."""
    started: list[Mosquitto] = []

    def start(**options) -> Mosquitto:
        server = Mosquitto(tmp_path / f"mosquitto{len(started)}", **options)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    """DSN of a PostgreSQL server where tests may create databases."""
    return os.environ.get("MQTT_TEST_PG", "host=127.0.0.1 port=5432 user=root dbname=postgres")


@pytest.fixture
def pg_database(pg_admin_dsn):
    """A fresh, empty database for one test; dropped afterwards. Yields its DSN."""
    import psycopg2

    name = f"mqtt_engine_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(pg_admin_dsn)
    admin.autocommit = True
    with admin.cursor() as cr:
        cr.execute(f'CREATE DATABASE "{name}"')
    dsn = re.sub(r"dbname=\S+", f"dbname={name}", pg_admin_dsn)
    try:
        yield dsn
    finally:
        with admin.cursor() as cr:
            cr.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            cr.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request, tmp_path):
    """An engine store with its tables: a fresh PostgreSQL database, or a SQLite file.

    SQLite has no NOTIFY: its runner polls, every half second here.
    """
    from mqtt_engine.store import open_store

    if request.param == "postgresql":
        result = open_store(request.getfixturevalue("pg_database"))
    else:
        result = open_store(f"sqlite:///{tmp_path / 'engine.sqlite3'}")
        result.poll_interval = 0.5
    result.create_schema()
    return result


@pytest.fixture
def runner():
    """Start runners on a store (heartbeat 0.5 s, ``**options`` for Runner); all are stopped
    after the test.
    """
    started: list[Runner] = []

    def start(store, **options) -> Runner:
        instance = Runner([store], heartbeat=0.5, **options)
        instance.start()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()
