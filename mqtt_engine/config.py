"""What the engine is told to do: brokers, subscriptions and the service switch.

These are plain values, read from the database (``mqtt_broker``, ``mqtt_subscription``,
``mqtt_service``) by the stores, or built from a standalone config file. Everything else in the
engine takes them as input and never reads configuration on its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

DEFAULT_MAX_PAYLOAD = 10 * 1024 * 1024
DEFAULT_SESSION_EXPIRY = 7 * 24 * 3600
DEFAULT_RECEIVE_MAXIMUM = 2000


@dataclass(frozen=True)
class WillConfig:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True)
class BrokerConfig:
    """One broker connection. ``password`` and the key never appear in ``repr`` or logs."""

    id: int
    name: str = ""
    host: str = "localhost"
    port: int = 1883
    transport: str = "tcp"  # "tcp" or "websockets"
    ws_path: str = "/mqtt"
    tls: bool = False
    tls_insecure: bool = False  # explicit switch: skip certificate and host name checks
    tls_ca_cert: str | None = field(default=None, repr=False)  # PEM text; None: system CAs
    tls_client_cert: str | None = field(default=None, repr=False)  # PEM text
    tls_client_key: str | None = field(default=None, repr=False)  # PEM text
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str = ""
    protocol: str = "5"  # "5" or "311"
    keepalive: int = 60
    clean_start: bool = False
    session_expiry: int = DEFAULT_SESSION_EXPIRY  # MQTT 5 only; 3.1.1 keeps the session forever
    receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM
    max_payload_size: int = DEFAULT_MAX_PAYLOAD
    will: WillConfig | None = None
    company_id: int | None = None

    @property
    def is_v5(self) -> bool:
        return self.protocol == "5"

    def effective_client_id(self, scope: str) -> str:
        """The configured client id, or one derived from ``scope`` (the database) and the id.

        Stable across restarts, so the broker keeps the persistent session while we are away.
        """
        if self.client_id:
            return self.client_id
        digest = hashlib.sha1(f"{scope}/{self.id}".encode()).hexdigest()[:12]
        return f"mqtt-listener-{digest}"


@dataclass(frozen=True)
class SubscriptionConfig:
    """One topic filter on one broker, with how its messages are deduplicated."""

    id: int
    broker_id: int
    topic_filter: str
    qos: int = 1
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    share_group: str | None = None
    dedup_mode: str = "none"  # "none", "property" (a user property) or "json" (a JSON key)
    dedup_key: str | None = None

    @property
    def broker_filter(self) -> str:
        """The filter sent to the broker: ``$share/<group>/<filter>`` for a shared one."""
        if self.share_group:
            return f"$share/{self.share_group}/{self.topic_filter}"
        return self.topic_filter

    @property
    def broker_qos(self) -> int:
        """The QoS asked of the broker: QoS 2 is received as QoS 1.

        paho keeps the QoS 2 receive handshake in memory only, so a crash between PUBREC and
        our commit loses the message for good (measured: hundreds in 20,000). At QoS 1 with
        acknowledgement after commit the broker redelivers instead; the dedup key turns those
        redeliveries into one row, which gives QoS 2's exactly-once in the database.
        """
        return min(self.qos, 1)


@dataclass(frozen=True)
class DesiredState:
    """Everything a database asks of its runner at one moment."""

    running: bool
    brokers: tuple[BrokerConfig, ...] = ()
    subscriptions: tuple[SubscriptionConfig, ...] = ()

    def subscriptions_of(self, broker_id: int) -> tuple[SubscriptionConfig, ...]:
        return tuple(s for s in self.subscriptions if s.broker_id == broker_id)


def _text(value) -> str | None:
    return value or None


def broker_from_row(row: dict) -> BrokerConfig:
    """A :class:`BrokerConfig` from an ``mqtt_broker`` row (column name -> value)."""
    will = None
    if row.get("will_topic"):
        will = WillConfig(
            topic=row["will_topic"],
            payload=(row.get("will_payload") or "").encode(),
            qos=int(row.get("will_qos") or 0),
            retain=bool(row.get("will_retain")),
        )
    return BrokerConfig(
        id=row["id"],
        name=row.get("name") or f"broker {row['id']}",
        host=row.get("host") or "localhost",
        port=int(row.get("port") or (8883 if row.get("tls") else 1883)),
        transport=row.get("transport") or "tcp",
        ws_path=row.get("ws_path") or "/mqtt",
        tls=bool(row.get("tls")),
        tls_insecure=bool(row.get("tls_insecure")),
        tls_ca_cert=_text(row.get("tls_ca_cert")),
        tls_client_cert=_text(row.get("tls_client_cert")),
        tls_client_key=_text(row.get("tls_client_key")),
        username=_text(row.get("username")),
        password=_text(row.get("password")),
        client_id=row.get("client_id") or "",
        protocol=str(row.get("protocol") or "5"),
        keepalive=int(60 if row.get("keepalive") is None else row["keepalive"]),  # 0: none
        clean_start=bool(row.get("clean_start")),
        session_expiry=int(
            DEFAULT_SESSION_EXPIRY if row.get("session_expiry") is None else row["session_expiry"]
        ),
        receive_maximum=int(row.get("receive_maximum") or DEFAULT_RECEIVE_MAXIMUM),
        max_payload_size=int(row.get("max_payload_size") or DEFAULT_MAX_PAYLOAD),
        will=will,
        company_id=row.get("company_id"),
    )


def subscription_from_row(row: dict) -> SubscriptionConfig:
    """A :class:`SubscriptionConfig` from an ``mqtt_subscription`` row."""
    return SubscriptionConfig(
        id=row["id"],
        broker_id=row["broker_id"],
        topic_filter=row["topic_filter"],
        qos=int(row.get("qos") or 0),
        no_local=bool(row.get("no_local")),
        retain_as_published=bool(row.get("retain_as_published")),
        retain_handling=int(row.get("retain_handling") or 0),
        share_group=_text(row.get("share_group")),
        dedup_mode=row.get("dedup_mode") or "none",
        dedup_key=_text(row.get("dedup_key")),
    )
