"""The stores against real databases: PostgreSQL (a fresh database per test) and SQLite."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from mqtt_engine import schema
from mqtt_engine.payload import from_column, to_column
from mqtt_engine.session import MessageProperties
from mqtt_engine.store import StoredMessage, open_store, utcnow

pytestmark = pytest.mark.timeout(60)


def _message(n: int, dedup: str | None = None, **overrides) -> StoredMessage:
    data = f'{{"n": {n}}}'.encode()
    values = dict(
        broker_id=1,
        subscription_id=None,
        company_id=None,
        state="received",
        topic=f"t/{n}",
        payload=to_column(data),
        payload_preview=data.decode(),
        payload_size=len(data),
        payload_hash="x",
        qos=1,
        retain=False,
        redelivered=False,
        dedup_key=dedup,
        error=None,
        received_at=time.time(),
    )
    values.update(overrides)
    return StoredMessage(**values)


def test_insert_is_idempotent_with_a_dedup_key(store):
    connection = store.connect()
    new, duplicates = connection.insert_messages([_message(1, "a"), _message(2, "b")])
    assert len(new) == 2 and duplicates == 0
    new, duplicates = connection.insert_messages([_message(1, "a"), _message(3, None)])
    assert len(new) == 1 and duplicates == 1
    rows = connection.execute(
        "SELECT dedup_key, redelivered FROM mqtt_publish_signal_history ORDER BY id"
    )
    assert [(key, bool(flag)) for key, flag in rows] == [
        ("a", True),
        ("b", False),
        (None, False),
    ]
    connection.close()


def test_payload_and_properties_round_trip_byte_exact(store):
    connection = store.connect()
    data = bytes(range(256)) + b"\x00\xff\xfe"
    props = MessageProperties(
        user_properties=[("k", "v1"), ("k", "v2"), ("unit", "°C")],
        content_type="application/octet-stream",
        response_topic="reply/here",
        correlation_data=b"\x00\x01corr",
        message_expiry=60,
        payload_format=0,
    )
    (row_id,), _ = connection.insert_messages(
        [_message(1, payload=to_column(data), payload_size=len(data), properties=props)]
    )
    ((stored, ctype, rtopic, corr, expiry),) = connection.execute(
        "SELECT payload, content_type, response_topic, correlation_data, message_expiry "
        "FROM mqtt_publish_signal_history WHERE id = %s",
        (row_id,),
    )
    assert from_column(stored) == data
    assert (ctype, rtopic, from_column(corr), expiry) == (
        "application/octet-stream",
        "reply/here",
        b"\x00\x01corr",
        60,
    )
    properties = connection.execute(
        "SELECT key, value FROM mqtt_user_property WHERE message_id = %s ORDER BY sequence",
        (row_id,),
    )
    assert properties == [("k", "v1"), ("k", "v2"), ("unit", "°C")]
    connection.close()


def test_outbox_rows_are_read_due_first_and_marked(store):
    connection = store.connect()
    later = utcnow() + dt.timedelta(hours=1)
    for topic, due in (("out/1", None), ("out/2", later), ("out/3", None)):
        connection.execute(
            "INSERT INTO mqtt_publish_signal_history "
            "(direction, state, broker_id, topic, payload, qos, retain, next_attempt_at) "
            "VALUES ('out', 'queued', 1, %s, %s, 1, %s, %s)",
            (topic, to_column(b"hello " + topic.encode()), False, due),
        )
    connection.commit()
    rows = connection.fetch_outbox(1, 10, exclude=())
    assert [r.topic for r in rows] == ["out/1", "out/3"]
    assert rows[0].payload == b"hello out/1"
    assert [r.topic for r in connection.fetch_outbox(1, 10, exclude=[rows[0].id])] == ["out/3"]
    connection.mark_sent([rows[0].id])
    connection.mark_publish_failed(rows[1].id, "refused by the broker: Not authorized", None)
    states = connection.execute(
        "SELECT topic, state, error FROM mqtt_publish_signal_history ORDER BY id"
    )
    assert states == [
        ("out/1", "sent", None),
        ("out/2", "queued", None),
        ("out/3", "failed", "refused by the broker: Not authorized"),
    ]
    assert connection.count_queued() == {1: 1}
    connection.close()


def test_state_rows_are_upserted(store):
    connection = store.connect()
    now = utcnow()
    connection.write_broker_states([{"broker_id": 7, "state": "connecting", "updated_at": now}])
    connection.write_broker_states([{"broker_id": 7, "state": "connected", "messages_in": 5}])
    assert connection.execute("SELECT broker_id, state, messages_in FROM mqtt_broker_state") == [
        (7, "connected", 5)
    ]
    runner = {"name": "h:1", "host": "h", "pid": 1, "mode": "engine", "role": "standby"}
    connection.write_runner({**runner, "heartbeat_at": now})
    connection.write_runner({**runner, "role": "active", "heartbeat_at": now})
    assert connection.execute("SELECT name, role FROM mqtt_runner") == [("h:1", "active")]
    connection.delete_runner("h:1")
    assert connection.execute("SELECT COUNT(*) FROM mqtt_runner") == [(0,)]
    connection.close()


def test_only_one_runner_lock_per_database(store):
    first, second = store.lock(), store.lock()
    assert first.try_acquire()
    assert not second.try_acquire()
    first.release()
    assert second.try_acquire()
    second.release()


def test_notify_wakes_the_lock_holder(pg_database):
    store = open_store(pg_database)
    lock = store.lock()
    assert lock.try_acquire()
    connection = store.connect()
    connection.execute("SELECT pg_notify(%s, %s)", (schema.NOTIFY_CHANNEL, "outbox"))
    assert lock.wait(0.2) == []  # not committed yet: NOTIFY is transactional
    connection.commit()
    assert lock.wait(5.0) == ["outbox"]
    connection.close()
    lock.release()


def test_lock_is_lost_when_its_connection_is_killed(pg_database):
    store = open_store(pg_database)
    lock = store.lock()
    assert lock.try_acquire()
    connection = store.connect()
    connection.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_locks "
        "WHERE locktype = 'advisory' AND pid <> pg_backend_pid() "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    connection.commit()
    assert not lock.alive()
    other = store.lock()
    assert other.try_acquire()
    other.release()
    connection.close()
