"""The broker session interface: what the engine needs from an MQTT client, and nothing more.

Ingest, outbox and runner talk to a :class:`Session` only, so a second transport can stand
beside the paho one (:mod:`.paho_session`) without touching them. A session:

- connects and keeps reconnecting (backoff with jitter) until stopped, resubscribing each time;
- holds a *desired* subscription set (:meth:`Session.set_subscriptions`) and reconciles the
  broker to it live: subscribe what is new or changed, unsubscribe what is gone;
- hands every received message to ``on_message`` from its network thread, **without
  acknowledging it**: the caller acknowledges with :meth:`Session.ack` once the message is
  committed. ``on_message`` may block; that is how intake slows when the database is slow.
  Each message carries the number of the network connection it came on; these numbers are
  unique in the process (not per session), so an acknowledgement can never reach a later
  connection, of this session or of one that replaced it, where its packet id means another
  message;
- publishes, and reports each publish's outcome through ``on_published``;
- reports its state through ``on_state`` and :attr:`Session.status`.

Callbacks run on the session's network thread and must not do database work (one exception:
``publish`` on a session that is not running answers "not connected" on the caller's thread).
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Connection states, as stored in ``mqtt_broker_state.state``.
CONNECTING = "connecting"
CONNECTED = "connected"
DISCONNECTED = "disconnected"
AUTH_FAILED = "auth_failed"
ERROR = "error"
STOPPED = "stopped"


@dataclass(slots=True)
class MessageProperties:
    """The MQTT 5 properties the engine stores.

    Under MQTT 5 a message always has one (empty when the publisher set nothing); under
    MQTT 3.1.1 ``InboundMessage.properties`` is None.
    """

    user_properties: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry: int | None = None
    payload_format: int | None = None


@dataclass(slots=True)
class InboundMessage:
    """A received PUBLISH, not yet acknowledged.

    ``topic`` is None when the topic bytes were not valid UTF-8 (``topic_error`` says why);
    such a message is still stored (as failed) and acknowledged; ``topic_raw`` holds its bytes
    (it is empty for a valid topic). ``connection`` identifies the
    network connection it arrived on: an acknowledgement for an older connection is dropped,
    because packet ids restart with every connection and the broker redelivers anyway.
    """

    topic: str | None
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int
    connection: int
    properties: MessageProperties | None = None
    received_at: float = field(default_factory=time.time)
    topic_error: str | None = None
    topic_raw: bytes = b""


@dataclass(slots=True)
class OutboundMessage:
    """A message to publish; ``token`` comes back in ``on_published`` (the outbox row id)."""

    token: int
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: MessageProperties | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionSpec:
    """One filter as sent to the broker (shared prefix included)."""

    topic_filter: str
    qos: int = 1
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(slots=True)
class SessionStatus:
    """A snapshot of a session, for the state row and ``check``."""

    state: str = DISCONNECTED
    since: float = field(default_factory=time.time)
    last_error: str | None = None
    last_connected_at: float | None = None
    last_packet_at: float | None = None
    subscribed: dict[str, int] = field(default_factory=dict)  # filter -> granted QoS
    failed_subscriptions: dict[str, str] = field(default_factory=dict)  # filter -> reason
    connection: int = 0
    silent: bool = False  # the watchdog saw no packet for longer than the keepalive allows


OnMessage = Callable[[InboundMessage], None]
OnPublished = Callable[[int, str | None], None]  # token, error (None: acknowledged)
OnState = Callable[[SessionStatus], None]


class Session(abc.ABC):
    """A connection to one broker; see the module docstring for the contract."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start connecting in the background; returns at once."""

    @abc.abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the persistent session stays on the broker) and end threads."""

    @abc.abstractmethod
    def set_subscriptions(self, specs: list[SubscriptionSpec]) -> None:
        """Replace the desired subscription set; the broker follows without a reconnect."""

    @abc.abstractmethod
    def ack(self, messages: list[InboundMessage]) -> int:
        """Acknowledge committed messages in the order given.

        Returns how many were queued for sending (messages of an earlier connection are
        skipped); the network thread sends them in that order.
        """

    @abc.abstractmethod
    def publish(self, message: OutboundMessage) -> None:
        """Queue a publish; its outcome arrives through ``on_published`` (never raises)."""

    @property
    @abc.abstractmethod
    def status(self) -> SessionStatus:
        """The current state (a copy)."""

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or ``timeout`` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status.state == CONNECTED:
                return True
            time.sleep(0.02)
        return self.status.state == CONNECTED


NOT_CONNECTED = "not connected"
CONNECTION_LOST = "connection lost before acknowledgement"
TRANSIENT_PUBLISH_ERRORS = (NOT_CONNECTED, CONNECTION_LOST)
"""``on_published`` errors that say nothing about the message: the outbox sends it again."""
