"""PahoSession against real mosquitto brokers: the shared one, and throwaway ones for password,
TLS, WebSocket, ACL, restart and half-open setups. Every wait is a condition with a deadline.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_engine.config import BrokerConfig, WillConfig
from mqtt_engine.paho_session import PahoSession, inbound_message
from mqtt_engine.session import (
    AUTH_FAILED,
    CONNECTED,
    DISCONNECTED,
    ERROR,
    STOPPED,
    InboundMessage,
    MessageProperties,
    OutboundMessage,
    SessionStatus,
    SubscriptionSpec,
)
from tests.support import wait_for

pytestmark = pytest.mark.timeout(120)

PROTOCOLS = pytest.mark.parametrize("protocol", ["5", "311"])


class Recorder:
    """Collects what a session reports through its callbacks."""

    def __init__(self):
        self.messages: list[InboundMessage] = []
        self.published: dict[int, str | None] = {}
        self.states: list[SessionStatus] = []
        self.lock = threading.Lock()

    def on_message(self, message: InboundMessage) -> None:
        with self.lock:
            self.messages.append(message)

    def on_published(self, token: int, error: str | None) -> None:
        self.published[token] = error

    def on_state(self, status: SessionStatus) -> None:
        self.states.append(status)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        with self.lock:
            return [m.payload for m in self.messages if topic is None or m.topic == topic]

    def find(self, payload: bytes) -> InboundMessage | None:
        with self.lock:
            return next((m for m in self.messages if m.payload == payload), None)


def config(port: int, protocol: str = "5", host: str = "127.0.0.1", **options) -> BrokerConfig:
    options.setdefault("session_expiry", 60)  # the shared broker forgets test sessions soon
    options.setdefault("keepalive", 10)
    return BrokerConfig(id=1, name="test", host=host, port=port, protocol=protocol, **options)


@pytest.fixture
def make_session():
    """``make_session(config, **kwargs) -> (session, recorder)``; all are stopped afterwards."""
    sessions: list[PahoSession] = []

    def make(broker: BrokerConfig, *, client_id: str | None = None, start=True, **kwargs):
        recorder = Recorder()
        kwargs.setdefault("reconnect_min", 0.05)
        kwargs.setdefault("reconnect_max", 0.5)
        session = PahoSession(
            broker,
            client_id=client_id or f"test-{uuid.uuid4().hex[:12]}",
            on_message=recorder.on_message,
            on_published=recorder.on_published,
            on_state=recorder.on_state,
            **kwargs,
        )
        sessions.append(session)
        if start:
            session.start()
        return session, recorder

    yield make
    for session in sessions:
        session.stop()


class Publisher:
    """A plain paho client (MQTT 5) that publishes test messages and waits for each PUBACK."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect(host, port)
        self.client.loop_start()

    def publish(self, topic, payload=b"", qos=1, retain=False, properties=None):
        info = self.client.publish(topic, payload, qos, retain, properties)
        info.wait_for_publish(5)
        assert info.is_published()

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker_address):
    pub = Publisher(broker_address[1], broker_address[0])
    yield pub
    pub.close()


def subscribed(session, *filters):
    """Wait until the broker granted every filter; returns the status."""
    return wait_for(
        lambda: (
            (s := session.status).state == CONNECTED
            and all(f in s.subscribed for f in filters)
            and s
        ),
        what=f"subscribed to {filters}",
    )


def forget_session(port: int, client_id: str, protocol: str, host: str = "127.0.0.1") -> None:
    """Drop a persistent session from the broker (clean start, no expiry)."""
    version = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=version,
        clean_session=None if protocol == "5" else True,
    )
    if protocol == "5":
        client.connect(host, port, clean_start=True)
    else:
        client.connect(host, port)
    client.loop_start()
    wait_for(client.is_connected, 5, "cleanup connection")
    client.disconnect()
    client.loop_stop()


# ---------------------------------------------------------------------------------------------


def test_invalid_utf8_topic_is_kept_raw():
    msg = mqtt.MQTTMessage(mid=7, topic=b"plant/\xff/temp")
    msg.payload = b"\x00\x01"
    msg.qos = 1
    message = inbound_message(msg, connection=3, v5=False)
    assert message.topic is None
    assert message.topic_raw == b"plant/\xff/temp"
    assert "UTF-8" in message.topic_error
    assert (message.payload, message.mid, message.connection) == (b"\x00\x01", 7, 3)


@PROTOCOLS
def test_receive_with_properties(protocol, broker_address, unique_topic, publisher, make_session):
    host, port = broker_address
    session, rec = make_session(config(port, protocol, host))
    session.set_subscriptions([SubscriptionSpec(f"{unique_topic}/#", qos=1)])
    status = subscribed(session, f"{unique_topic}/#")
    assert status.subscribed == {f"{unique_topic}/#": 1}
    assert status.connection > 0 and status.last_error is None

    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("id", "42"), ("source", "line 1"), ("id", "43")]
    props.ContentType = "text/plain"
    props.ResponseTopic = f"{unique_topic}/reply"
    props.CorrelationData = b"\x00\x01corr"
    props.MessageExpiryInterval = 3600
    props.PayloadFormatIndicator = 1
    payload = "temp 21.5 \N{DEGREE SIGN}C".encode()
    publisher.publish(f"{unique_topic}/a", payload, qos=1, properties=props)
    publisher.publish(f"{unique_topic}/b", b"\x00\xff\xfe binary", qos=0)

    wait_for(lambda: len(rec.messages) == 2, what="two messages")
    first, second = rec.messages
    assert (first.topic, first.payload, first.qos, first.retain, first.dup) == (
        f"{unique_topic}/a",
        payload,
        1,
        False,
        False,
    )
    assert first.mid > 0 and first.connection == status.connection and first.topic_error is None
    assert (second.payload, second.qos) == (b"\x00\xff\xfe binary", 0)
    if protocol == "5":
        p = first.properties
        assert p.user_properties == [("id", "42"), ("source", "line 1"), ("id", "43")]
        assert p.content_type == "text/plain"
        assert p.response_topic == f"{unique_topic}/reply"
        assert p.correlation_data == b"\x00\x01corr"
        assert 3590 <= p.message_expiry <= 3600
        assert p.payload_format == 1
        assert second.properties == MessageProperties()
    else:
        assert first.properties is None and second.properties is None
    assert session.ack(rec.messages) == 1  # the QoS 0 message has nothing to acknowledge


@PROTOCOLS
def test_unacknowledged_message_is_redelivered(
    protocol, broker_address, unique_topic, publisher, make_session
):
    host, port = broker_address
    client_id = f"redeliver-{uuid.uuid4().hex[:10]}"
    topic = f"{unique_topic}/data"
    specs = [SubscriptionSpec(topic, qos=1)]

    first, rec1 = make_session(config(port, protocol, host), client_id=client_id)
    first.set_subscriptions(specs)
    subscribed(first, topic)
    publisher.publish(topic, b"m1")
    message = wait_for(lambda: rec1.find(b"m1"), what="m1")
    assert not message.dup
    first.stop()  # never acknowledged
    assert first.status.state == STOPPED

    second, rec2 = make_session(config(port, protocol, host), client_id=client_id)
    second.set_subscriptions(specs)
    again = wait_for(lambda: rec2.find(b"m1"), what="m1 redelivered")
    assert again.dup and again.connection == second.status.connection
    subscribed(second, topic)
    assert first.ack([message]) == 0  # a stopped session sends nothing
    assert second.ack([message]) == 0  # a message of another connection is skipped
    assert second.ack([again]) == 1
    publisher.publish(topic, b"marker")
    wait_for(lambda: rec2.find(b"marker"), what="marker")
    second.ack([rec2.find(b"marker")])
    second.stop()

    third, rec3 = make_session(config(port, protocol, host), client_id=client_id)
    third.set_subscriptions(specs)
    subscribed(third, topic)
    publisher.publish(topic, b"marker2")
    wait_for(lambda: rec3.find(b"marker2"), what="marker2")
    assert rec3.payloads() == [b"marker2"]  # m1 and marker were acknowledged: not redelivered
    third.stop()
    forget_session(port, client_id, protocol, host)


@PROTOCOLS
def test_live_subscription_changes(protocol, broker_address, unique_topic, publisher, make_session):
    host, port = broker_address
    a, b = f"{unique_topic}/a", f"{unique_topic}/b"
    session, rec = make_session(config(port, protocol, host))
    session.set_subscriptions([SubscriptionSpec(a, qos=0)])
    connection = subscribed(session, a).connection
    assert session.status.subscribed == {a: 0}

    session.set_subscriptions([SubscriptionSpec(a, qos=1)])  # QoS change
    wait_for(lambda: session.status.subscribed.get(a) == 1, what="QoS 1 granted")
    publisher.publish(a, b"on a")
    assert wait_for(lambda: rec.find(b"on a"), what="message on a").qos == 1

    session.set_subscriptions([SubscriptionSpec(a, qos=1), SubscriptionSpec(b, qos=1)])  # add
    subscribed(session, a, b)
    session.set_subscriptions([SubscriptionSpec(b, qos=1)])  # remove a
    wait_for(lambda: a not in session.status.subscribed, what="a unsubscribed")
    assert session.status.subscribed == {b: 1}
    publisher.publish(a, b"after removal")
    publisher.publish(b, b"on b")
    wait_for(lambda: rec.find(b"on b"), what="message on b")
    assert rec.find(b"after removal") is None
    assert session.status.connection == connection  # no reconnect for any of it


def test_subscribe_options_v5(broker_address, unique_topic, publisher, make_session):
    host, port = broker_address
    retained, local = f"{unique_topic}/retained", f"{unique_topic}/local"
    publisher.publish(retained, b"kept", retain=True)
    try:
        session, rec = make_session(config(port, "5", host))
        session.set_subscriptions(
            [
                SubscriptionSpec(retained, qos=1, retain_handling=2),  # never send retained
                SubscriptionSpec(local, qos=1, no_local=True),
            ]
        )
        connection = subscribed(session, retained, local).connection
        session.publish(OutboundMessage(token=1, topic=local, payload=b"mine", qos=1))
        wait_for(lambda: 1 in rec.published, what="own publish acknowledged")
        publisher.publish(local, b"theirs")
        wait_for(lambda: rec.find(b"theirs"), what="other client's message")
        assert rec.find(b"mine") is None  # no local
        assert rec.find(b"kept") is None  # retain handling 2

        session.set_subscriptions(
            [
                SubscriptionSpec(retained, qos=1, retain_handling=0, retain_as_published=True),
                SubscriptionSpec(local, qos=1, no_local=True),
            ]
        )
        kept = wait_for(lambda: rec.find(b"kept"), what="retained message")
        assert kept.retain
        assert session.status.connection == connection
    finally:
        publisher.publish(retained, b"", retain=True)  # clear the retained message


@PROTOCOLS
def test_publish_is_acknowledged(protocol, broker_address, unique_topic, make_session):
    host, port = broker_address
    session, rec = make_session(config(port, protocol, host))
    session.set_subscriptions([SubscriptionSpec(f"{unique_topic}/#", qos=1)])
    subscribed(session, f"{unique_topic}/#")
    properties = MessageProperties(user_properties=[("id", "7")], content_type="text/plain")
    for qos in (0, 1, 2):
        session.publish(
            OutboundMessage(
                token=100 + qos,
                topic=f"{unique_topic}/q{qos}",
                payload=b"q%d" % qos,
                qos=qos,
                properties=properties,
            )
        )
    wait_for(lambda: len(rec.published) == 3, what="three publishes reported")
    assert rec.published == {100: None, 101: None, 102: None}
    wait_for(lambda: len(rec.messages) == 3, what="three messages back")
    if protocol == "5":
        assert rec.find(b"q1").properties.user_properties == [("id", "7")]
    session.publish(OutboundMessage(token=5, topic=f"{unique_topic}/+", payload=b"x", qos=1))
    wait_for(lambda: 5 in rec.published, what="invalid publish reported")
    assert rec.published[5].startswith("invalid message")


def test_publish_while_disconnected_reports_at_once(make_session):
    from tests.mosquitto import free_port

    session, rec = make_session(config(free_port()))
    wait_for(lambda: session.status.last_error, what="a connect failure")
    status = session.status
    assert status.state == DISCONNECTED
    assert "refused" in status.last_error
    session.publish(OutboundMessage(token=1, topic="t", payload=b"x", qos=1))
    wait_for(lambda: 1 in rec.published, 2, "publish reported")
    assert rec.published[1] == "not connected"
    session.stop()
    session.publish(OutboundMessage(token=2, topic="t", payload=b"x", qos=1))
    assert rec.published[2] == "not connected"  # after stop: answered in the caller's thread


def test_callback_exception_does_not_kill_the_thread(
    broker_address, unique_topic, publisher, make_session, caplog
):
    host, port = broker_address
    seen = []

    def on_message(message):
        seen.append(message.payload)
        if message.payload == b"boom":
            raise RuntimeError("handler bug")

    session = PahoSession(
        config(port, "5", host), client_id=f"test-{uuid.uuid4().hex[:8]}", on_message=on_message
    )
    try:
        session.set_subscriptions([SubscriptionSpec(unique_topic, qos=1)])
        session.start()
        connection = subscribed(session, unique_topic).connection
        publisher.publish(unique_topic, b"boom")
        publisher.publish(unique_topic, b"after")
        wait_for(lambda: b"after" in seen, what="second message")
        assert session.status.connection == connection
        assert any("handler bug" in (r.exc_text or "") for r in caplog.records)
    finally:
        session.stop()


# ------------------------------------------------------------------ brokers of our own


@PROTOCOLS
def test_wrong_password_is_auth_failed_and_retried_slowly(
    protocol, mosquitto_factory, make_session, caplog
):
    caplog.set_level(logging.DEBUG)
    secret = f"s3cret-{uuid.uuid4().hex[:8]}"
    broker = mosquitto_factory(users={"alice": "right-password"})
    session, rec = make_session(
        config(broker.port, protocol, username="alice", password=secret), auth_retry=0.5
    )
    wait_for(lambda: session.status.state == AUTH_FAILED, what="auth_failed")
    failed_at = time.monotonic()
    refusals = "disconnected, not authorised"
    wait_for(lambda: broker.log_text().count(refusals) >= 4, 10, "three retries")
    elapsed = time.monotonic() - failed_at
    assert elapsed >= 3 * 0.5 * 0.75 - 0.1  # retried every auth_retry ±25 %: no tight loop
    status = session.status
    assert status.state == AUTH_FAILED
    assert status.last_error.startswith("authentication failed")
    assert "password" in status.last_error
    assert all(s.state == AUTH_FAILED for s in rec.states[rec.states.index(status) :])

    everything = [r.getMessage() for r in caplog.records]
    everything += [r.exc_text or "" for r in caplog.records]
    everything += [repr(session), repr(status), repr(session.config), *map(repr, rec.states)]
    assert any("authentication failed" in line for line in everything)
    assert not [line for line in everything if secret in line]

    good, _ = make_session(
        config(broker.port, protocol, username="alice", password="right-password")
    )
    assert good.wait_connected(5)


def test_tls_verification(mosquitto_factory, make_session):
    broker = mosquitto_factory(tls=True)
    port = broker.tls_port

    untrusted, _ = make_session(config(port, tls=True))  # the system CAs do not know ours
    wait_for(lambda: untrusted.status.state == ERROR, what="certificate error")
    assert "not trusted" in untrusted.status.last_error
    assert "certificate" in untrusted.status.last_error
    untrusted.stop()

    trusted, rec = make_session(config(port, tls=True, tls_ca_cert=broker.ca_pem))
    assert trusted.wait_connected(5), trusted.status
    trusted.publish(OutboundMessage(token=1, topic="tls/test", payload=b"x", qos=1))
    wait_for(lambda: 1 in rec.published, what="publish over TLS")
    assert rec.published[1] is None

    by_name, _ = make_session(config(port, host="localhost", tls=True, tls_ca_cert=broker.ca_pem))
    assert by_name.wait_connected(5), by_name.status

    insecure, _ = make_session(config(port, tls=True, tls_insecure=True))
    assert insecure.wait_connected(5), insecure.status


def test_tls_client_certificate_required(mosquitto_factory, make_session):
    broker = mosquitto_factory(tls=True, require_certificate=True)
    port = broker.tls_port

    without, _ = make_session(config(port, tls=True, tls_ca_cert=broker.ca_pem))
    wait_for(lambda: without.status.state == ERROR, what="client certificate error")
    assert "client certificate" in without.status.last_error
    without.stop()

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "mqtt-tls-*")))
    with_cert, _ = make_session(
        config(
            port,
            tls=True,
            tls_ca_cert=broker.ca_pem,
            tls_client_cert=broker.client_cert_pem,
            tls_client_key=broker.client_key_pem,
        )
    )
    assert with_cert.wait_connected(5), with_cert.status
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "mqtt-tls-*"))) == before
    assert broker.client_key_pem not in repr(with_cert.config)


@PROTOCOLS
def test_websocket_transport(protocol, mosquitto_factory, make_session):
    broker = mosquitto_factory(websockets=True)
    session, rec = make_session(config(broker.ws_port, protocol, transport="websockets"))
    session.set_subscriptions([SubscriptionSpec("ws/#", qos=1)])
    subscribed(session, "ws/#")
    session.publish(OutboundMessage(token=1, topic="ws/echo", payload=b"x" * 70000, qos=1))
    message = wait_for(lambda: rec.find(b"x" * 70000), what="own message back")
    assert message.topic == "ws/echo"
    wait_for(lambda: 1 in rec.published, what="PUBACK over WebSocket")
    assert rec.published == {1: None}

    wrong, _ = make_session(config(broker.ws_port, protocol, transport="websockets", ws_path="/x"))
    wait_for(lambda: wrong.status.state == ERROR, what="WebSocket error")
    assert "WebSocket" in wrong.status.last_error


@PROTOCOLS
def test_broker_refuses_a_subscription(protocol, mosquitto_factory, make_session):
    broker = mosquitto_factory(denied=["denied/#"])
    session, rec = make_session(config(broker.port, protocol))
    session.set_subscriptions(
        [
            SubscriptionSpec("allowed/#", qos=1),
            SubscriptionSpec("denied/#", qos=1),
            SubscriptionSpec("bad/#/filter", qos=1),  # mosquitto would drop the connection
        ]
    )
    connection = wait_for(lambda: session.wait_connected(5) and session.status.connection)
    status = wait_for(
        lambda: (s := session.status).failed_subscriptions.get("denied/#") and s,
        what="refused subscription recorded",
    )
    assert status.failed_subscriptions["denied/#"].startswith("refused by the broker")
    assert status.failed_subscriptions["bad/#/filter"].startswith("invalid filter")
    wait_for(lambda: "allowed/#" in session.status.subscribed, what="allowed subscription")
    assert "denied/#" not in session.status.subscribed
    assert session.status.state == CONNECTED and session.status.connection == connection
    if protocol == "5":
        session.publish(OutboundMessage(token=1, topic="denied/x", payload=b"x", qos=1))
        wait_for(lambda: 1 in rec.published, what="refused publish reported")
        assert rec.published[1] == "Not authorized"


@PROTOCOLS
def test_broker_restart_reconnects_resubscribes_and_redelivers(
    protocol, mosquitto_factory, make_session
):
    broker = mosquitto_factory(persistence=True)
    session, rec = make_session(config(broker.port, protocol), reconnect_max=1.0)
    session.set_subscriptions([SubscriptionSpec("plant/#", qos=1)])
    connection = subscribed(session, "plant/#").connection
    pub = Publisher(broker.port)
    pub.publish("plant/line1", b"before restart")
    pub.close()
    before = wait_for(lambda: rec.find(b"before restart"), what="message before restart")

    broker.restart()  # SIGTERM: mosquitto saves the session with the unacknowledged message
    back = time.monotonic()
    wait_for(
        lambda: session.status.connection > connection and session.status.state == CONNECTED,
        10,
        "reconnected",
    )
    assert time.monotonic() - back < 3.0
    assert any(s.state == DISCONNECTED and "connection lost" in s.last_error for s in rec.states)
    again = wait_for(
        lambda: next((m for m in rec.messages if m.dup and m.payload == b"before restart"), None),
        what="redelivery after the restart",
    )
    assert again.connection == session.status.connection != before.connection
    assert session.ack([before]) == 0  # its packet id belongs to the old connection
    assert session.ack([again]) == 1

    subscribed(session, "plant/#")
    pub = Publisher(broker.port)
    try:
        pub.publish("plant/line1", b"after restart")
    finally:
        pub.close()
    wait_for(lambda: rec.find(b"after restart"), what="message after restart")


def test_half_open_connection_is_detected_and_replaced(mosquitto_factory, make_session):
    broker = mosquitto_factory()
    session, rec = make_session(config(broker.port, "5", keepalive=2))
    assert session.wait_connected(5)
    connection = session.status.connection
    broker.pause()  # the TCP connection stays up, nothing answers
    try:
        session.publish(OutboundMessage(token=1, topic="t", payload=b"x", qos=1))
        wait_for(lambda: session.status.silent, 6, "watchdog flags silence")
        wait_for(lambda: 1 in rec.published, 8, "pending publish reported")
        assert rec.published[1] == "connection lost before acknowledgement"
        wait_for(lambda: session.status.state != CONNECTED, 2, "connection given up")
    finally:
        broker.resume()
    wait_for(
        lambda: session.status.state == CONNECTED and session.status.connection > connection,
        15,
        "reconnected",
    )
    assert not session.status.silent


def test_will_is_published_on_unclean_loss_only(broker_address, unique_topic, make_session):
    host, port = broker_address
    client_id = f"will-{uuid.uuid4().hex[:10]}"
    will = WillConfig(topic=f"{unique_topic}/will", payload=b"gone", qos=1)
    watcher, seen = make_session(config(port, "5", host))
    watcher.set_subscriptions([SubscriptionSpec(f"{unique_topic}/#", qos=1)])
    subscribed(watcher, f"{unique_topic}/#")

    clean, _ = make_session(config(port, "5", host, will=will, session_expiry=0))
    assert clean.wait_connected(5)
    clean.stop()  # normal disconnection: no will

    lost, rec = make_session(  # slow to reconnect: no takeover war with the thief
        config(port, "5", host, will=will, session_expiry=0), client_id=client_id, reconnect_min=5
    )
    assert lost.wait_connected(5)
    thief = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
    )
    thief.connect(host, port)
    thief.loop_start()
    try:
        wait_for(lambda: seen.find(b"gone"), what="will published")
        wait_for(
            lambda: any("connection lost" in (s.last_error or "") for s in rec.states),
            what="takeover reported",
        )
        lost.stop()
    finally:
        thief.disconnect()
        thief.loop_stop()
    assert seen.payloads(f"{unique_topic}/will") == [b"gone"]
