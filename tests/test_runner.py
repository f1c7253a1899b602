"""The runner end to end, in this process, against the real broker and real databases.

What a user of the engine checks: configure a broker and a subscription in the database, publish
with paho, see the rows; change the configuration and see the listener follow within seconds;
switch the service off and on; publish through the outbox.
"""

from __future__ import annotations

import json
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_engine import schema
from mqtt_engine.payload import from_column, to_column
from mqtt_engine.runner import Runner
from mqtt_engine.standalone import sync_to_store
from mqtt_engine.store import open_store
from tests.support import wait_for

pytestmark = pytest.mark.timeout(90)


class Publisher:
    """A paho client for the test side of the wire."""

    def __init__(self, host: str, port: int, protocol=mqtt.MQTTv5):
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )
        self.received: list[mqtt.MQTTMessage] = []
        self.client.on_message = lambda _c, _u, message: self.received.append(message)
        connected = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect(host, port)
        self.client.loop_start()
        assert connected.wait(10), "test publisher could not connect"

    def publish(self, topic, payload, qos=1, properties=None):
        self.client.publish(topic, payload, qos=qos, properties=properties).wait_for_publish(10)

    def subscribe(self, topic_filter: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic_filter, qos=1)
        assert done.wait(10)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker_address):
    client = Publisher(*broker_address)
    yield client
    client.close()


def configure(store, broker_address, subscriptions, **broker):
    host, port = broker_address
    values = {
        "name": "test",
        "host": host,
        "port": port,
        "client_id": f"engine-{uuid.uuid4().hex[:10]}",
        **broker,
    }
    sync_to_store(store, {"broker": [{**values, "subscription": subscriptions}]})


def rows(
    store,
    sql="SELECT topic, payload, state, error FROM mqtt_publish_signal_history "
    "WHERE direction = 'in' ORDER BY id",
    params=(),
):
    connection = store.connect()
    try:
        return connection.execute(sql, params)
    finally:
        connection.close()


def execute(store, sql, params=()):
    connection = store.connect()
    try:
        connection.execute(sql, params)
        if store.dialect == "postgresql" and sql.lstrip().upper().startswith(("UPDATE", "INSERT")):
            connection.execute("SELECT pg_notify(%s, 'config')", (schema.NOTIFY_CHANNEL,))
        connection.commit()
    finally:
        connection.close()


def broker_state(store):
    found = rows(store, "SELECT state, subscribed, last_error FROM mqtt_broker_state")
    return found[0] if found else None


def subscribed(store, topic_filter):
    state = broker_state(store)
    return state and state[0] == "connected" and topic_filter in (state[1] or "")


@pytest.mark.parametrize("protocol", ["5", "311"])
def test_messages_are_stored_with_properties(
    store, runner, publisher, broker_address, unique_topic, protocol
):
    configure(store, broker_address, [{"topic_filter": f"{unique_topic}/#"}], protocol=protocol)
    runner(store)
    wait_for(lambda: subscribed(store, f"{unique_topic}/#"), 15, "the subscription")
    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = [("site", "plant-1"), ("line", "3")]
    properties.ContentType = "application/json"
    publisher.publish(f"{unique_topic}/scale/1", b'{"kg": 12.5}', properties=properties)
    publisher.publish(f"{unique_topic}/scale/2", b"\x00\xffbinary")
    found = wait_for(lambda: len(rows(store)) == 2 and rows(store), 15, "two stored rows")
    assert [(t, from_column(p), s) for t, p, s, _ in found] == [
        (f"{unique_topic}/scale/1", b'{"kg": 12.5}', "received"),
        (f"{unique_topic}/scale/2", b"\x00\xffbinary", "received"),
    ]
    user_properties = rows(
        store, "SELECT key, value FROM mqtt_user_property ORDER BY message_id, sequence"
    )
    content_types = rows(store, "SELECT content_type FROM mqtt_publish_signal_history ORDER BY id")
    if protocol == "5":
        assert user_properties == [("site", "plant-1"), ("line", "3")]
        assert content_types == [("application/json",), (None,)]
    else:
        assert user_properties == []  # MQTT 3.1.1 has no properties


def test_subscription_added_while_running_is_live(
    store, runner, publisher, broker_address, unique_topic
):
    configure(store, broker_address, [{"topic_filter": f"{unique_topic}/a"}])
    runner(store)
    wait_for(lambda: subscribed(store, f"{unique_topic}/a"), 15, "the first subscription")
    connection_before = broker_state(store)
    execute(
        store,
        "INSERT INTO mqtt_subscription (broker_id, active, topic_filter, qos) "
        "SELECT id, %s, %s, '1' FROM mqtt_broker",
        (True, f"{unique_topic}/b"),
    )
    wait_for(lambda: subscribed(store, f"{unique_topic}/b"), 10, "the added subscription")
    publisher.publish(f"{unique_topic}/b", b"live")
    wait_for(lambda: rows(store), 10, "the message on the new subscription")
    assert connection_before[0] == "connected"
    execute(
        store,
        "UPDATE mqtt_subscription SET active = %s WHERE topic_filter = %s",
        (False, f"{unique_topic}/a"),
    )
    wait_for(lambda: not subscribed(store, f"{unique_topic}/a"), 10, "the unsubscription")


def test_service_stop_and_start(store, runner, publisher, broker_address, unique_topic):
    configure(store, broker_address, [{"topic_filter": f"{unique_topic}/#"}], clean_start=False)
    runner(store)
    wait_for(lambda: subscribed(store, f"{unique_topic}/#"), 15, "the subscription")
    execute(store, "UPDATE mqtt_service SET desired_state = 'stopped'")
    wait_for(lambda: (broker_state(store) or ("",))[0] == "stopped", 10, "the stopped state")
    # Stopped, but the persistent session keeps what arrives meanwhile.
    publisher.publish(f"{unique_topic}/while-stopped", b"kept", qos=1)
    assert rows(store) == []
    execute(store, "UPDATE mqtt_service SET desired_state = 'running'")
    found = wait_for(lambda: rows(store), 15, "the message kept while stopped")
    assert from_column(found[0][1]) == b"kept"


def test_outbox_publishes_and_marks_sent(store, runner, publisher, broker_address, unique_topic):
    configure(store, broker_address, [])
    publisher.subscribe(f"{unique_topic}/out/#")
    instance = runner(store)
    wait_for(lambda: (broker_state(store) or ("",))[0] == "connected", 15, "the connection")
    for qos in (0, 1, 2):
        execute(
            store,
            "INSERT INTO mqtt_publish_signal_history (direction, state, broker_id, topic, payload,"
            " qos, retain) SELECT 'out', 'queued', id, %s, %s, %s, %s FROM mqtt_broker",
            (f"{unique_topic}/out/{qos}", to_column(f"q{qos}".encode()), qos, False),
        )
    execute(
        store,
        "INSERT INTO mqtt_publish_signal_history (direction, state, broker_id, topic, payload, "
        "qos, retain) SELECT 'out', 'queued', id, %s, %s, 1, %s FROM mqtt_broker",
        (f"{unique_topic}/out/+", to_column(b"bad"), False),
    )
    if store.dialect == "postgresql":
        execute(store, "SELECT pg_notify(%s, 'outbox')", (schema.NOTIFY_CHANNEL,))
    else:
        for database in instance.databases.values():
            for worker in database.workers.values():
                worker.pipeline.wake_outbox()
    wait_for(lambda: len(publisher.received) == 3, 15, "three published messages")
    assert sorted(m.payload for m in publisher.received) == [b"q0", b"q1", b"q2"]
    states = wait_for(
        lambda: (
            (
                found := rows(
                    store,
                    "SELECT topic, state, error FROM mqtt_publish_signal_history "
                    "WHERE direction = 'out' ORDER BY id",
                )
            )
            and all(state != "queued" for _, state, _ in found)
            and found
        ),
        15,
        "every outbox row settled",
    )
    assert [s for _, s, _ in states] == ["sent", "sent", "sent", "failed"]
    assert "invalid topic" in states[3][2]


def test_broker_row_and_runner_row_show_the_actual_state(
    store, runner, broker_address, unique_topic
):
    configure(store, broker_address, [{"topic_filter": f"{unique_topic}/x", "qos": 2}])
    runner(store)
    wait_for(lambda: subscribed(store, f"{unique_topic}/x"), 15, "the subscription")
    _state, subscribed_text, _error = broker_state(store)
    # QoS 2 subscriptions are asked of the broker at QoS 1 (see SubscriptionConfig.broker_qos).
    assert subscribed_text == f"{unique_topic}/x 1"
    # The runner row comes with the first heartbeat, which may commit after the subscription.
    wait_for(
        lambda: rows(store, "SELECT role FROM mqtt_runner") == [("active",)],
        15,
        lambda: f"the runner row active: {rows(store, 'SELECT role, name FROM mqtt_runner')}",
    )


def test_unreachable_broker_is_reported_and_the_runner_keeps_going(store, runner, unique_topic):
    configure(store, ("127.0.0.1", 1), [{"topic_filter": f"{unique_topic}/#"}])
    runner(store)
    state = wait_for(
        lambda: (s := broker_state(store)) and s[2] and s, 15, "an error in the state row"
    )
    assert state[0] in ("disconnected", "error")
    assert "refused" in state[2].lower()


def test_payloads_stored_byte_exact_at_qos0_and_json_dedup(
    store, runner, publisher, broker_address, unique_topic
):
    configure(
        store,
        broker_address,
        [{"topic_filter": f"{unique_topic}/#", "dedup_mode": "json", "dedup_key": "id"}],
    )
    runner(store)
    wait_for(lambda: subscribed(store, f"{unique_topic}/#"), 15, "the subscription")
    for body in (b'{"id": 1, "v": 1}', b'{"id": 1, "v": 1}', b'{"id": 2}', b"not json"):
        publisher.publish(f"{unique_topic}/d", body)
    found = wait_for(lambda: len(rows(store)) == 3 and rows(store), 15, "three rows")
    assert [(from_column(p), s) for _, p, s, _ in found] == [
        (b'{"id": 1, "v": 1}', "received"),
        (b'{"id": 2}', "received"),
        (b"not json", "failed"),
    ]
    assert "JSON" in found[2][3]
    assert json.loads(from_column(found[0][1])) == {"id": 1, "v": 1}


def test_one_runner_serves_several_databases_and_brokers(
    runner, publisher, broker_address, unique_topic, tmp_path, pg_database
):
    host, port = broker_address
    stores = [open_store(pg_database), open_store(f"sqlite:///{tmp_path / 'second.sqlite3'}")]
    for index, store in enumerate(stores):
        store.create_schema()
        sync_to_store(
            store,
            {
                "broker": [
                    {
                        "name": f"b{n}",
                        "host": host,
                        "port": port,
                        "client_id": f"engine-{uuid.uuid4().hex[:10]}",
                        "subscription": [{"topic_filter": f"{unique_topic}/db{index}/b{n}"}],
                    }
                    for n in range(2)
                ]
            },
        )
    instance = Runner(stores, heartbeat=0.5)
    instance.start()
    try:
        for index, store in enumerate(stores):
            for n in range(2):
                wait_for(
                    lambda s=store, f=f"{unique_topic}/db{index}/b{n}": any(
                        state == "connected" and f in (text or "")
                        for state, text in rows(
                            s, "SELECT state, subscribed FROM mqtt_broker_state"
                        )
                    ),
                    15,
                    f"database {index} broker {n}",
                )
                publisher.publish(f"{unique_topic}/db{index}/b{n}", f"{index}-{n}".encode())
        for index, store in enumerate(stores):
            found = wait_for(lambda s=store: len(rows(s)) == 2 and rows(s), 15, "two rows")
            assert sorted(from_column(p) for _, p, _, _ in found) == [
                f"{index}-0".encode(),
                f"{index}-1".encode(),
            ]
        instance.forget(stores[1].name)
        assert set(instance.databases) == {stores[0].name}
    finally:
        instance.stop()


def test_a_second_runner_stands_by_and_takes_over(
    runner, publisher, broker_address, unique_topic, pg_database
):
    store = open_store(pg_database)
    store.create_schema()
    configure(store, broker_address, [{"topic_filter": f"{unique_topic}/#"}])
    first = Runner([store], heartbeat=0.5, lock_retry=0.5)
    first.name = "first:1"
    first.start()
    wait_for(lambda: subscribed(store, f"{unique_topic}/#"), 15, "the first runner")
    second = runner(store, lock_retry=0.5)
    wait_for(
        lambda: ("standby",) in rows(store, "SELECT role FROM mqtt_runner"), 10, "a standby row"
    )
    assert not second.is_active(store.name)
    first.stop()
    wait_for(lambda: second.is_active(store.name), 15, "the second runner to take over")
    wait_for(lambda: subscribed(store, f"{unique_topic}/#"), 15, "the takeover subscription")
    publisher.publish(f"{unique_topic}/after", b"after takeover")
    found = wait_for(lambda: rows(store), 15, "the message after the takeover")
    assert from_column(found[0][1]) == b"after takeover"
