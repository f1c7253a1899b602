"""The outbox's promises, end to end: a private mosquitto, a real database, a paho subscriber.

A row inserted with ``direction = 'out'`` and ``state = 'queued'`` (see :mod:`mqtt_engine.outbox`)
is published by the runner and marked ``sent`` only once the broker acknowledged it; it waits,
still ``queued``, while the broker is down or while no runner runs; a refusal by the broker
makes it ``failed`` with the reason; its MQTT 5 properties (user properties from
``mqtt_user_property``) go out with it. Every wait is a condition with a deadline
(:func:`wait_for`); the windows in which nothing may happen are watched with :func:`hold_for`,
which fails the moment the condition breaks.
"""

from __future__ import annotations

import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_engine import schema
from mqtt_engine.paho_session import PahoSession
from mqtt_engine.payload import to_column
from tests.support import hold_for, wait_for
from tests.test_runner import broker_state, configure, rows

pytestmark = pytest.mark.timeout(120)

OUTBOX_ROWS = (
    "SELECT id, topic, state, error, sent_at FROM mqtt_publish_signal_history "
    "WHERE direction = 'out' ORDER BY id"
)


def fast_reconnect_session(broker, **kwargs) -> PahoSession:
    """The default session, but retrying within a second: the tests wait on brokers coming back."""
    return PahoSession(broker, reconnect_max=1.0, **kwargs)


@pytest.fixture
def runner(runner):
    """The shared fixture (heartbeat 0.5 s, stopped after the test), with fast reconnects."""
    return lambda store: runner(store, session_factory=fast_reconnect_session)


class Subscriber:
    """An MQTT 5 paho client with a persistent session on the private broker.

    It subscribes once, at QoS 2; the session (kept in the broker's persistence file across a
    clean restart) keeps the subscription and what arrives while the client is away, and paho
    reconnects it by itself.
    """

    def __init__(self, port: int, topic_filter: str):
        self.received: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=0.5)
        self.client.on_message = self._on_message
        connected = threading.Event()
        subscribed = threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.on_subscribe = lambda *a: subscribed.set()
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=properties)
        self.client.loop_start()
        assert connected.wait(10), "the test subscriber could not connect"
        self.client.subscribe(topic_filter, qos=2)
        assert subscribed.wait(10), "the test subscriber's SUBACK"

    def _on_message(self, _client, _userdata, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append(message)

    def messages(self) -> list[mqtt.MQTTMessage]:
        with self._lock:
            return list(self.received)

    def payloads(self) -> list[bytes]:
        return sorted(m.payload for m in self.messages())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscribers():
    opened: list[Subscriber] = []

    def open_(port: int, topic_filter: str) -> Subscriber:
        subscriber = Subscriber(port, topic_filter)
        opened.append(subscriber)
        return subscriber

    yield open_
    for subscriber in opened:
        subscriber.close()


def queue(store, topic: str, payload: bytes, qos: int = 1, user_properties=(), **columns) -> int:
    """Insert one queued outbound row (and its user properties), as Odoo does; its id.

    On PostgreSQL the row is announced with ``NOTIFY mqtt_listener, 'outbox'`` in the same
    transaction (delivered at commit); SQLite has no NOTIFY, the runner finds it by polling.
    """
    connection = store.connect()
    try:
        (broker_id,) = connection.execute("SELECT id FROM mqtt_broker")[0]
        if "correlation_data" in columns:
            columns["correlation_data"] = to_column(columns["correlation_data"])
        values = {
            "direction": "out",
            "state": "queued",
            "broker_id": broker_id,
            "topic": topic,
            "payload": to_column(payload),
            "qos": qos,
            "retain": False,
            **columns,
        }
        marks = ", ".join(["%s"] * len(values))
        ((row_id,),) = connection.execute(
            f"INSERT INTO mqtt_publish_signal_history ({', '.join(values)}) "
            f"VALUES ({marks}) RETURNING id",
            list(values.values()),
        )
        for sequence, (key, value) in enumerate(user_properties, start=1):
            connection.execute(
                "INSERT INTO mqtt_user_property (message_id, sequence, key, value) "
                "VALUES (%s, %s, %s, %s)",
                (row_id, sequence, key, value),
            )
        if store.dialect == "postgresql":
            connection.execute("SELECT pg_notify(%s, 'outbox')", (schema.NOTIFY_CHANNEL,))
        connection.commit()
        return row_id
    finally:
        connection.close()


def outbox(store) -> dict[int, tuple]:
    """Outbound rows by id: (topic, state, error, sent_at)."""
    return {row[0]: row[1:] for row in rows(store, OUTBOX_ROWS)}


def states(store) -> list[str]:
    return [state for _topic, state, _error, _sent in outbox(store).values()]


def connected(store) -> bool:
    return (broker_state(store) or ("",))[0] == "connected"


def settled(store, count: int):
    """The outbound rows once ``count`` of them exist and none is queued any more."""
    found = outbox(store)
    done = len(found) == count and all(row[1] != "queued" for row in found.values())
    return done and found


def test_rows_queued_while_the_broker_is_down_are_sent_when_it_is_back(
    store, runner, subscribers, mosquitto_factory, unique_topic
):
    broker = mosquitto_factory(persistence=True)
    subscriber = subscribers(broker.port, f"{unique_topic}/#")
    configure(store, ("127.0.0.1", broker.port), [])
    runner(store)
    wait_for(lambda: connected(store), 15, "the engine's connection")

    broker.stop()  # SIGTERM: mosquitto saves the subscriber's session and subscription
    wait_for(lambda: not connected(store), 10, "the engine to see the broker gone")
    queue(store, f"{unique_topic}/q1", b"while down, qos 1", qos=1)
    queue(store, f"{unique_topic}/q2", b"while down, qos 2", qos=2)
    # Nothing can acknowledge them: they stay queued (and are not marked sent on a hope).
    hold_for(
        lambda: states(store) == ["queued", "queued"],
        2.0,
        lambda: f"both rows queued while the broker is down: {outbox(store)}",
    )

    broker.start()
    found = wait_for(lambda: settled(store, 2), 20, lambda: f"both rows sent: {outbox(store)}")
    assert [(t, s, e) for t, s, e, _ in found.values()] == [
        (f"{unique_topic}/q1", "sent", None),
        (f"{unique_topic}/q2", "sent", None),
    ]
    assert all(sent_at for *_, sent_at in found.values())
    wait_for(lambda: len(subscriber.messages()) >= 2, 15, "both messages at the subscriber")
    # Exactly once each: no duplicate arrives afterwards either.
    hold_for(lambda: len(subscriber.messages()) == 2, 1.0, "no duplicate delivery")
    by_topic = {m.topic: m for m in subscriber.messages()}
    assert sorted(by_topic) == [f"{unique_topic}/q1", f"{unique_topic}/q2"]
    assert by_topic[f"{unique_topic}/q1"].payload == b"while down, qos 1"
    assert by_topic[f"{unique_topic}/q1"].qos == 1
    assert by_topic[f"{unique_topic}/q2"].payload == b"while down, qos 2"
    assert by_topic[f"{unique_topic}/q2"].qos == 2


def test_rows_queued_while_no_runner_runs_are_sent_by_the_next_runner(
    store, runner, subscribers, mosquitto_factory, unique_topic
):
    broker = mosquitto_factory()
    subscriber = subscribers(broker.port, f"{unique_topic}/#")
    configure(store, ("127.0.0.1", broker.port), [])
    first = runner(store)
    wait_for(lambda: connected(store), 15, "the first runner's connection")
    queue(store, f"{unique_topic}/before", b"before the stop", qos=1)
    wait_for(lambda: settled(store, 1), 15, lambda: f"the first row sent: {outbox(store)}")
    wait_for(lambda: subscriber.payloads() == [b"before the stop"], 10, "the first message")

    first.stop()
    assert rows(store, "SELECT name FROM mqtt_runner") == []  # no runner serves it
    queue(store, f"{unique_topic}/stopped/1", b"no runner, qos 1", qos=1)
    queue(store, f"{unique_topic}/stopped/2", b"no runner, qos 2", qos=2)
    hold_for(
        lambda: states(store) == ["sent", "queued", "queued"],
        1.0,
        lambda: f"the rows queued while no runner runs: {outbox(store)}",
    )
    assert subscriber.payloads() == [b"before the stop"]

    runner(store)
    found = wait_for(lambda: settled(store, 3), 20, lambda: f"every row sent: {outbox(store)}")
    assert [s for _t, s, _e, _sent in found.values()] == ["sent", "sent", "sent"]
    expected = sorted([b"before the stop", b"no runner, qos 1", b"no runner, qos 2"])
    wait_for(lambda: len(subscriber.messages()) >= 3, 15, "the messages of the second runner")
    hold_for(lambda: len(subscriber.messages()) == 3, 1.0, "no duplicate delivery")
    assert subscriber.payloads() == expected


@pytest.mark.parametrize(
    "queue_limit",
    [
        # "No limit": mosquitto before 2.0.22 (eclipse-mosquitto/mosquitto#3244) then drops the
        # connection ("Quota exceeded") right after every refusal.
        0,
        # A stock limit: the refusal alone, the connection stays.
        1000,
    ],
    ids=["max_queued_messages_0", "max_queued_messages_1000"],
)
def test_a_qos1_publish_refused_by_the_broker_is_failed_with_the_reason(
    store, runner, subscribers, mosquitto_factory, unique_topic, queue_limit
):
    # mosquitto 2.0 answers a denied QoS 1 PUBLISH with PUBACK "Not authorized" (0x87) to an
    # MQTT 5 client (the engine's default protocol); a 3.1.1 client gets a plain PUBACK, so
    # under 3.1.1 a refusal cannot be told from a success (not tested: nothing to see).
    broker = mosquitto_factory(
        denied=[f"{unique_topic}/denied/#"],
        extra=f"max_queued_messages {queue_limit}",
    )
    subscriber = subscribers(broker.port, f"{unique_topic}/allowed/#")
    configure(store, ("127.0.0.1", broker.port), [])
    runner(store)
    wait_for(lambda: connected(store), 15, "the engine's connection")
    denied = queue(store, f"{unique_topic}/denied/1", b"refused, qos 1", qos=1)
    allowed = queue(store, f"{unique_topic}/allowed", b"accepted", qos=1)

    found = wait_for(lambda: settled(store, 2), 15, lambda: f"every row settled: {outbox(store)}")
    assert found[allowed][1:3] == ("sent", None)
    _topic, state, error, sent_at = found[denied]
    assert (state, sent_at) == ("failed", None), found[denied]
    assert "refused by the broker" in error
    assert "not authorized" in error.lower()
    wait_for(lambda: subscriber.payloads() == [b"accepted"], 10, "the accepted message")


def test_a_row_that_makes_the_broker_hang_up_is_failed_and_does_not_starve_the_rest(
    store, runner, subscribers, mosquitto_factory, unique_topic
):
    # mosquitto 2.0.11 with max_queued_messages 0 drops the connection after a refused QoS 2
    # PUBLISH (mosquitto#3244), before any PUBCOMP: the row is in flight at every drop. (With a
    # stock limit paho would report the refused QoS 2 publish as acknowledged: it ignores
    # PUBREC's reason code, eclipse-paho/paho.mqtt.python#895; see mqtt_engine/outbox.py.)
    broker = mosquitto_factory(denied=[f"{unique_topic}/denied/#"], extra="max_queued_messages 0")
    subscriber = subscribers(broker.port, f"{unique_topic}/allowed/#")
    configure(store, ("127.0.0.1", broker.port), [])
    runner(store)
    wait_for(lambda: connected(store), 15, "the engine's connection")
    poison = queue(store, f"{unique_topic}/denied/2", b"refused, qos 2", qos=2)
    allowed = queue(store, f"{unique_topic}/allowed", b"behind it", qos=1)

    found = wait_for(lambda: settled(store, 2), 30, lambda: f"every row settled: {outbox(store)}")
    _topic, state, error, sent_at = found[poison]
    assert (state, sent_at) == ("failed", None), found[poison]
    assert "dropped the connection 3 times" in error
    assert found[allowed][1:3] == ("sent", None)
    wait_for(lambda: subscriber.payloads() == [b"behind it"], 10, "the row behind it")


def test_mqtt5_properties_of_an_outbound_row_arrive(
    store, runner, subscribers, mosquitto_factory, unique_topic
):
    broker = mosquitto_factory()
    subscriber = subscribers(broker.port, f"{unique_topic}/#")
    configure(store, ("127.0.0.1", broker.port), [])
    runner(store)
    wait_for(lambda: connected(store), 15, "the engine's connection")
    user_properties = [("site", "plant-1"), ("line", "3"), ("site", "plant-2"), ("empty", "")]
    row_id = queue(
        store,
        f"{unique_topic}/props",
        '{"kg": 12.5, "unit": "µg"}'.encode(),
        qos=1,
        user_properties=user_properties,
        content_type="application/json",
        response_topic=f"{unique_topic}/reply",
        correlation_data=b"\x00\x01corr\xff",
        message_expiry=300,
        payload_format=1,
    )
    plain_id = queue(store, f"{unique_topic}/plain", b"no properties", qos=1)

    found = wait_for(lambda: settled(store, 2), 15, lambda: f"both rows settled: {outbox(store)}")
    assert found[row_id][1] == found[plain_id][1] == "sent"
    wait_for(lambda: len(subscriber.messages()) == 2, 10, "both messages at the subscriber")
    by_topic = {m.topic: m for m in subscriber.messages()}
    message = by_topic[f"{unique_topic}/props"]
    assert message.payload == '{"kg": 12.5, "unit": "µg"}'.encode()
    props = message.properties
    assert props.UserProperty == user_properties
    assert props.ContentType == "application/json"
    assert props.ResponseTopic == f"{unique_topic}/reply"
    assert props.CorrelationData == b"\x00\x01corr\xff"
    # The broker forwards the remaining lifetime: at most what was set, and not much less.
    assert 290 <= props.MessageExpiryInterval <= 300
    assert props.PayloadFormatIndicator == 1
    plain = by_topic[f"{unique_topic}/plain"].properties
    for name in ("UserProperty", "ContentType", "ResponseTopic", "CorrelationData"):
        assert not hasattr(plain, name), name
    assert not hasattr(plain, "MessageExpiryInterval")
