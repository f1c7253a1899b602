"""The paho-mqtt transport: one broker connection, kept alive by a network thread of its own.

What an operator sees and what it means
---------------------------------------

The state (``mqtt_broker_state.state``, :attr:`PahoSession.status`) is one of:

``connecting``
    A connection attempt is under way (DNS, TCP, TLS, WebSocket upgrade, MQTT CONNECT).
``connected``
    The broker accepted the CONNECT; subscriptions are (re)sent at once.
``disconnected``
    The broker is unreachable or the connection dropped: refused or timed-out TCP, a reset, a
    broker shutdown, a keepalive timeout. ``last_error`` says which. Retried with exponential
    backoff and full jitter: the first retry after ``reconnect_min`` (0.5 s), then a random
    delay in a window that doubles up to ``reconnect_max`` (30 s). The window starts small
    again once a connection has lasted 10 s, so two clients fighting over one client id slow
    down instead of kicking each other off in a tight loop.
``auth_failed``
    The broker refused the user name or password (MQTT 5 reason 134/135, MQTT 3.1.1 return code
    4/5; mosquitto answers "not authorized" for a wrong password). Retried slowly: every
    ``auth_retry`` seconds (30 s, ±25 % jitter). The state stays ``auth_failed`` during those
    retries until one succeeds.
``error``
    Something a retry alone will not fix: the host name does not resolve, the broker's TLS
    certificate is not trusted (no or wrong CA; ``tls_insecure`` is the explicit switch that skips
    the check), the broker wants a client certificate, the WebSocket path is wrong, or the broker
    refused the CONNECT for another reason. Retried with the same backoff as ``disconnected``.
``stopped``
    :meth:`PahoSession.stop` was called: the session disconnected with "normal disconnection",
    which keeps the persistent session (and the messages the broker queues for it) on the broker.

``last_error`` is plain text for a person; no password, key or certificate ever appears in it,
in a log line or in ``repr``.

Delivery
--------

- Received messages are handed to ``on_message`` *unacknowledged*; PUBACK (PUBCOMP for QoS 2)
  goes out only through :meth:`PahoSession.ack`, after the caller committed them. An ack for a
  message of an earlier connection is skipped: packet ids restart with every connection and the
  broker redelivers (with the dup flag) what was not acknowledged on the connection it was sent
  on. Connection numbers are unique within the process, so this also holds for a message
  handed over by an earlier session object. A message whose ``on_message`` raised is logged
  and stays unacknowledged until then.
- Persistent sessions: clean start is ``BrokerConfig.clean_start`` (off by default); under
  MQTT 5 the CONNECT asks for ``SessionExpiryInterval = session_expiry`` and
  ``ReceiveMaximum = receive_maximum`` (the broker sends no more unacknowledged messages than
  that, which bounds memory). Under MQTT 3.1.1 ``clean_session = clean_start``.
- **QoS 2.** paho keeps the QoS 2 receive handshake in memory only, and this transport starts a
  fresh paho client for every connection: a QoS 2 message caught between PUBREC and PUBCOMP by a
  crash or a reconnect is lost for good. The caller therefore subscribes QoS 2 filters at QoS 1
  (:attr:`mqtt_engine.config.SubscriptionConfig.broker_qos`) and deduplicates; this session just
  uses the QoS of each :class:`~mqtt_engine.session.SubscriptionSpec` it is given.
- Publishing: ``on_published(token, None)`` on PUBACK (QoS 1) or PUBCOMP (QoS 2), and for QoS 0
  once paho wrote the packet to the socket; ``on_published(token, "<reason>")`` when the broker
  answers with an error reason code. While not connected a publish is answered at once with
  ``"not connected"`` rather than queued in memory, and publishes still unacknowledged when a
  connection ends get ``"connection lost before acknowledgement"``; the outbox sends those again.

Subscriptions
-------------

:meth:`PahoSession.set_subscriptions` replaces the desired set; the network thread sends the
difference (SUBSCRIBE for new filters and for changed QoS or options, UNSUBSCRIBE for removed
ones) without reconnecting, and resubscribes everything after every reconnect. ``status.subscribed``
holds the QoS the broker granted; a filter the broker refused (a SUBACK reason code of 0x80 or
more, e.g. "Not authorized" from an ACL) or that is not a valid filter (mosquitto would drop the
whole connection for it) is in ``status.failed_subscriptions`` with the reason, and logged.

The network thread
------------------

One thread per session runs its own ``select()`` over the socket and a wake-up socket, and drives
paho through its external-loop API (``loop_read``, ``loop_write``, ``loop_misc``). Every paho
call happens on that thread: ``ack``, ``publish`` and ``set_subscriptions`` from other threads
only queue work and wake it. Callbacks (``on_message``, ``on_published``, ``on_state``) run on
it; ``on_message`` may block, which is how intake slows down (while it blocks nothing is read,
and the broker stops sending once Receive Maximum messages are unacknowledged). An exception in a
callback is logged and never ends the thread. paho reads one packet per ``loop_read()``; while
each read brings a message the thread reads on (up to ``READ_BURST``) before it selects again
and sends the queued acknowledgements: in a flood, one select() and one round of bookkeeping
serve a run of messages instead of one.

A watchdog sets ``status.silent`` and logs a warning when nothing arrived from the broker for
1.5 x keepalive: paho sends PINGREQ after one keepalive period of silence and closes the
connection when no PINGRESP came within another, so a half-open connection ends in a reconnect
after about 2 x keepalive; the watchdog closes it itself should that not have happened by
2.5 x keepalive.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import random
import selectors
import socket
import ssl
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from .config import BrokerConfig
from .session import (
    AUTH_FAILED,
    CONNECTED,
    CONNECTING,
    CONNECTION_LOST,
    DISCONNECTED,
    ERROR,
    NOT_CONNECTED,
    STOPPED,
    InboundMessage,
    MessageProperties,
    OnMessage,
    OnPublished,
    OnState,
    OutboundMessage,
    Session,
    SessionStatus,
    SubscriptionSpec,
)
from .tls import TlsSettingsError, client_context, ssl_reason
from .topics import TopicError, validate_filter

_logger = logging.getLogger(__name__)


CONNECT_TIMEOUT = 5.0  # seconds for TCP connect, TLS handshake and WebSocket upgrade each
CONNACK_TIMEOUT = 10.0  # seconds from the CONNECT to the CONNACK
STABLE_AFTER = 10.0  # a connection that lasted this long resets the reconnect backoff
TICK = 0.5  # the watchdog's period; everything else is woken by events
# paho reads one packet per loop_read(): while each read brings a message, read again (up to
# this many) before going back to select(), acks and commands.
READ_BURST = 32
SUBSCRIBE_CHUNK = 100  # filters per SUBSCRIBE / UNSUBSCRIBE packet
AUTH_CODES = {
    134: "authentication failed: bad user name or password",
    135: "authentication failed: not authorized (check the user name and password)",
}

_ACK = 1
_PUBLISH = 2

# Connection numbers are unique in the process, not just per session: a message received by a
# session that was since replaced (new settings, restart) can never be acknowledged on the new
# session's connection, where its packet id means another message.
_connection_numbers = itertools.count(1)


def message_properties(properties: Properties | None) -> MessageProperties | None:
    """The MQTT 5 properties of a received PUBLISH that the engine stores.

    paho keeps each property present as an attribute of that name; reading them from the
    instance's attributes costs a dict lookup each, where ``getattr`` with a default pays for
    an AttributeError per absent property (this runs for every message).
    """
    if properties is None:
        return None
    present = vars(properties)
    user = present.get("UserProperty")
    return MessageProperties(
        user_properties=[(str(k), str(v)) for k, v in user] if user else [],
        content_type=present.get("ContentType"),
        response_topic=present.get("ResponseTopic"),
        correlation_data=present.get("CorrelationData"),
        message_expiry=present.get("MessageExpiryInterval"),
        payload_format=present.get("PayloadFormatIndicator"),
    )


def publish_properties(properties: MessageProperties | None) -> Properties | None:
    """paho ``Properties`` for an outgoing MQTT 5 PUBLISH (None when there are none)."""
    if properties is None:
        return None
    result = Properties(PacketTypes.PUBLISH)
    empty = True
    if properties.user_properties:
        result.UserProperty = [(str(k), str(v)) for k, v in properties.user_properties]
        empty = False
    for name, value in (
        ("ContentType", properties.content_type),
        ("ResponseTopic", properties.response_topic),
        ("CorrelationData", properties.correlation_data),
        ("MessageExpiryInterval", properties.message_expiry),
        ("PayloadFormatIndicator", properties.payload_format),
    ):
        if value is not None:
            setattr(result, name, value)
            empty = False
    return None if empty else result


def inbound_message(msg: mqtt.MQTTMessage, connection: int, v5: bool) -> InboundMessage:
    """Our :class:`InboundMessage` for a paho message; cheap, for the network thread.

    A topic that is not valid UTF-8 is kept as raw bytes (from the decode error) with the
    reason, so the message can still be stored as failed and acknowledged.
    """
    topic_raw = b""
    topic_error = None
    try:
        topic = msg.topic
    except UnicodeDecodeError as exc:
        topic = None
        topic_raw = bytes(exc.object)
        topic_error = f"topic is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    return InboundMessage(
        topic=topic,
        payload=bytes(msg.payload),
        qos=msg.qos,
        retain=bool(msg.retain),
        dup=bool(msg.dup),
        mid=msg.mid,
        connection=connection,
        properties=message_properties(msg.properties) if v5 else None,
        received_at=time.time(),
        topic_error=topic_error,
        topic_raw=topic_raw,
    )


class _PahoLog(logging.LoggerAdapter):
    """paho's own log lines, demoted to DEBUG, remembering the last error paho reported.

    paho reports socket failures (a TLS alert, a reset) only through its log; the last one
    becomes part of ``last_error`` when a connection ends. paho never logs passwords.
    """

    def __init__(self, logger: logging.Logger):
        super().__init__(logger, {})
        self.last_error: str | None = None

    def log(self, level, msg, *args, **kwargs):
        if level >= logging.ERROR:
            try:
                self.last_error = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                self.last_error = str(msg)
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("paho: " + str(msg), *args)


@dataclasses.dataclass
class _Outcome:
    """How a connection attempt ended, for the choice of the next delay."""

    auth_failed: bool = False
    stable: bool = False


class PahoSession(Session):
    """A :class:`~mqtt_engine.session.Session` on paho-mqtt 2.x; see the module docstring."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        client_id: str,
        on_message: OnMessage,
        on_state: OnState | None = None,
        on_published: OnPublished | None = None,
        logger: logging.Logger | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        auth_retry: float = 30.0,
    ):
        self.config = config
        self.client_id = client_id
        self.reconnect_min = max(0.01, reconnect_min)
        self.reconnect_max = max(self.reconnect_min, reconnect_max)
        self.auth_retry = auth_retry
        self._on_message = on_message
        self._on_state = on_state
        self._on_published = on_published
        self._logger = logger or _logger
        self._paho_log = _PahoLog(self._logger.getChild("paho"))
        self._label = config.name or f"broker {config.id}"
        self._v5 = config.is_v5

        # Shared with other threads, under _lock.
        self._lock = threading.Lock()
        self._status = SessionStatus(state=DISCONNECTED)
        self._desired: dict[str, SubscriptionSpec] = {}
        self._rejected: dict[str, str] = {}  # filters refused before reaching the broker
        self._subs_dirty = False
        self._commands: collections.deque = collections.deque()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False  # the network thread answers queued commands
        self._wake_r: socket.socket | None = None  # the network thread waits on it, others
        self._wake_w: socket.socket | None = None  # write a byte to it (see _wake)
        self._selector: selectors.BaseSelector | None = None

        # The network thread's own.
        self._client: mqtt.Client | None = None
        self._connected = False
        self._connected_at = 0.0
        self._keepalive = config.keepalive
        self._sent: dict[str, SubscriptionSpec] = {}  # what this connection told the broker
        self._sub_mids: dict[int, list[SubscriptionSpec]] = {}
        self._unsub_mids: dict[int, list[str]] = {}
        self._pending: dict[int, int] = {}  # publish mid -> token
        self._refusal: tuple[str, str] | None = None  # (state, text) from a refused CONNACK
        self._drop_reason: str | None = None
        self._attempt = 0
        self._logged_error: str | None = None
        self._last_rx = 0.0
        self._received = 0  # messages handed over (the network thread only)
        self._next_watch = 0.0
        self._ssl_context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        c = self.config
        return (
            f"<PahoSession {self._label!r} {c.host}:{c.port} client_id={self.client_id!r} "
            f"state={self._status.state}>"
        )

    # ------------------------------------------------------------------ public interface

    def start(self) -> None:
        """Start connecting in the background; returns at once."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # selectors (epoll on Linux), not select(): an Odoo server may well use fds above 1024.
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self._label}", daemon=True)
        with self._lock:
            self._running = True
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect ("normal disconnection", the session stays on the broker); end the thread."""
        self._stopping.set()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self._logger.warning(
                    "%s: network thread still busy %.0fs after stop (a callback blocks?)",
                    self._label,
                    timeout,
                )
        elif thread is None:
            self._set_state(STOPPED)

    def set_subscriptions(self, specs: list[SubscriptionSpec]) -> None:
        """Replace the desired subscription set; the network thread sends the difference."""
        desired: dict[str, SubscriptionSpec] = {}
        rejected: dict[str, str] = {}
        for spec in specs:
            try:
                validate_filter(spec.topic_filter)
            except TopicError as exc:
                rejected[spec.topic_filter] = f"invalid filter: {exc}"
                continue
            desired[spec.topic_filter] = spec
        with self._lock:
            failed = self._status.failed_subscriptions
            for topic_filter in list(failed):
                if topic_filter not in desired or topic_filter in self._rejected:
                    del failed[topic_filter]
            failed.update(rejected)
            self._desired = desired
            self._rejected = rejected
            self._subs_dirty = True
        for reason in rejected.values():
            self._logger.warning("%s: not subscribing: %s", self._label, reason)
        self._wake()

    def ack(self, messages: list[InboundMessage]) -> int:
        """Acknowledge committed messages in the order given; returns how many were queued.

        Messages of an earlier connection are skipped (the broker redelivers them), as are
        QoS 0 messages (nothing to acknowledge). The acks are written by the network thread.
        """
        with self._lock:
            if self._status.state != CONNECTED:
                return 0
            current = self._status.connection
        count = 0
        for message in messages:
            if message.qos and message.connection == current:
                self._commands.append((_ACK, current, message.mid, message.qos))
                count += 1
        if count:
            self._wake()
        return count

    def publish(self, message: OutboundMessage) -> None:
        """Queue a publish; ``on_published`` reports its outcome from the network thread.

        On a session that is not running (never started, or stopped) the answer, "not
        connected", comes at once on the caller's thread: there is no network thread to give it.
        """
        with self._lock:
            running = self._running
            if running:
                self._commands.append((_PUBLISH, message))
        if running:
            self._wake()
        else:  # not started, or stopped: nobody else would answer
            self._report(message.token, NOT_CONNECTED)

    @property
    def status(self) -> SessionStatus:
        """The current state (a copy)."""
        with self._lock:
            return self._status_copy()

    # ----------------------------------------------------------------------- helpers

    def _status_copy(self) -> SessionStatus:
        s = self._status
        return dataclasses.replace(
            s, subscribed=dict(s.subscribed), failed_subscriptions=dict(s.failed_subscriptions)
        )

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError, AttributeError):
            self._wake_w.send(b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass

    def _notify(self) -> None:
        if self._on_state is None:
            return
        with self._lock:
            snapshot = self._status_copy()
        self._call(self._on_state, snapshot)

    def _call(self, callback, *args) -> None:
        """Run a user callback; an exception is logged and never reaches paho or the loop."""
        try:
            callback(*args)
        except Exception:
            self._logger.exception(
                "%s: %s raised", self._label, getattr(callback, "__name__", "callback")
            )

    def _set_state(self, state: str, error: str | None = None, *, keep_error=False) -> None:
        with self._lock:
            s = self._status
            changed = s.state != state or (not keep_error and s.last_error != error)
            if s.state != state:
                s.state = state
                s.since = time.time()
            if not keep_error:
                s.last_error = error
            if state != CONNECTED:
                s.subscribed.clear()
                s.silent = False
        if changed:
            self._notify()

    def _report(self, token: int, error: str | None) -> None:
        if self._on_published is not None:
            self._call(self._on_published, token, error)

    # ------------------------------------------------------------------ network thread

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    outcome = self._connect_once()
                except Exception as exc:
                    self._logger.exception(
                        "%s: unexpected error in the network thread", self._label
                    )
                    self._set_state(ERROR, f"internal error: {exc}")
                    outcome = _Outcome()
                if self._stopping.is_set():
                    break
                self._idle(self._next_delay(outcome))
        finally:
            with self._lock:
                self._running = False  # from here on publish() answers by itself
            self._fail_commands()
            self._set_state(STOPPED, keep_error=True)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()
            self._logger.info("%s: stopped", self._label)

    def _next_delay(self, outcome: _Outcome) -> float:
        """Exponential backoff with full jitter; slow and steady after an auth failure."""
        if outcome.auth_failed:
            delay = self.auth_retry * random.uniform(0.75, 1.25)
        else:
            if outcome.stable:
                self._attempt = 0
            window = min(self.reconnect_max, self.reconnect_min * 2 ** min(self._attempt, 30))
            self._attempt += 1
            delay = random.uniform(self.reconnect_min, window)
        with self._lock:
            error = self._status.last_error
        if error:
            # One line per attempt; a warning when the reason is new, else info.
            level = logging.INFO if error == self._logged_error else logging.WARNING
            self._logged_error = error
            self._logger.log(level, "%s: %s; retrying in %.1fs", self._label, error, delay)
        return delay

    def _idle(self, delay: float) -> None:
        """Wait ``delay`` seconds between connections, answering commands; stop cuts it short."""
        deadline = time.monotonic() + delay
        while not self._stopping.is_set():
            self._fail_commands()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._selector.select(remaining)
            self._drain_wake()

    def _fail_commands(self) -> None:
        """While not connected: publishes answer "not connected", acks are moot."""
        while self._commands:
            command = self._commands.popleft()
            if command[0] == _PUBLISH:
                self._report(command[1].token, NOT_CONNECTED)

    # -- one connection -----------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        c = self.config
        protocol = MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if self._v5 else c.clean_start,
            protocol=protocol,
            transport="websockets" if c.transport == "websockets" else "tcp",
            reconnect_on_failure=False,
            manual_ack=True,
        )
        client.logger = self._paho_log
        client.connect_timeout = CONNECT_TIMEOUT
        if c.transport == "websockets":
            client.ws_set_options(path=c.ws_path or "/mqtt")
        if c.tls:
            if self._ssl_context is None:
                self._ssl_context = self._make_ssl_context()
            client.tls_set_context(self._ssl_context)
        if c.username or c.password:
            client.username_pw_set(c.username or "", c.password)
        if c.will is not None:
            client.will_set(c.will.topic, c.will.payload, c.will.qos, c.will.retain)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_unsubscribe = self._handle_unsubscribe
        # External-loop mode: paho queues packets and our loop writes them, also for
        # publishes and acks, so every socket write happens in one place.
        client.on_socket_register_write = _ignore
        return client

    def _make_ssl_context(self) -> ssl.SSLContext:
        """TLS settings from PEM text (see :mod:`.tls`)."""
        try:
            return client_context(self.config)
        except TlsSettingsError as exc:
            raise _ConfigError(str(exc)) from None

    def _connect_once(self) -> _Outcome:
        c = self.config
        with self._lock:
            previous = self._status.state
        if previous not in (AUTH_FAILED, ERROR):
            self._set_state(CONNECTING, keep_error=True)
        self._refusal = None
        self._drop_reason = None
        self._paho_log.last_error = None
        try:
            client = self._new_client()
        except (_ConfigError, ValueError, TypeError) as exc:
            self._fail(ERROR, str(exc) if isinstance(exc, _ConfigError) else f"settings: {exc}")
            return _Outcome()
        self._client = client
        self._keepalive = c.keepalive
        started = time.monotonic()
        try:
            properties = None
            if self._v5:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = max(0, min(c.session_expiry, 0xFFFFFFFF))
                properties.ReceiveMaximum = max(1, min(c.receive_maximum, 65535))
                client.connect(
                    c.host, c.port, c.keepalive, clean_start=c.clean_start, properties=properties
                )
            else:
                client.connect(c.host, c.port, c.keepalive)
        except Exception as exc:
            state, text = self._describe_connect_error(exc)
            self._fail(state, text)
            self._close(client)
            return _Outcome()
        self._last_rx = time.monotonic()
        try:
            self._serve(client, started)
        finally:
            self._close(client)
            connected = self._connected
            self._end_connection()
        if self._refusal is not None:
            state, text = self._refusal
            self._fail(state, text)
            return _Outcome(auth_failed=state == AUTH_FAILED)
        if self._stopping.is_set():
            return _Outcome()
        reason = self._drop_reason or self._paho_log.last_error
        if not connected:
            state, text = self._describe_early_close(reason)
            self._fail(state, text)
            return _Outcome()
        reason = reason or "the broker closed it"
        lasted = time.monotonic() - self._connected_at
        self._set_state(DISCONNECTED, f"connection lost: {reason}")
        return _Outcome(stable=lasted >= STABLE_AFTER)

    def _fail(self, state: str, text: str) -> None:
        """A failed attempt; :meth:`_next_delay` logs it with the retry delay."""
        self._set_state(state, text)

    def _describe_connect_error(self, exc: BaseException) -> tuple[str, str]:
        """(state, plain text) for an exception from the TCP, TLS or WebSocket setup."""
        c = self.config
        where = f"{c.host}:{c.port}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return ERROR, (
                f"TLS: the certificate of {where} is not trusted: "
                f"{exc.verify_message or ssl_reason(exc)} (give the CA certificate that "
                "signed it, or switch on tls_insecure to skip the check)"
            )
        if isinstance(exc, ssl.SSLError):
            return ERROR, f"TLS handshake with {where} failed: {ssl_reason(exc)}"
        if isinstance(exc, socket.gaierror):
            return ERROR, f"cannot resolve host name {c.host!r}: {exc.strerror or exc}"
        if isinstance(exc, mqtt.WebsocketConnectionError):
            return ERROR, (
                f"WebSocket upgrade at {where}{c.ws_path} failed: {exc} "
                "(is the path right, and is it a WebSocket listener?)"
            )
        if c.tls and isinstance(exc, ConnectionResetError):
            return ERROR, (
                f"TLS handshake with {where} failed: the connection was reset "
                "(does that port speak TLS?)"
            )
        if isinstance(exc, ConnectionRefusedError):
            return DISCONNECTED, f"connection to {where} refused (is the broker running there?)"
        if isinstance(exc, TimeoutError):
            return DISCONNECTED, f"timed out connecting to {where}"
        if isinstance(exc, OSError):
            return DISCONNECTED, f"cannot connect to {where}: {exc.strerror or exc}"
        return ERROR, f"cannot connect to {where}: {exc}"

    def _describe_early_close(self, reason: str | None) -> tuple[str, str]:
        """(state, text) when the connection closed before a CONNACK."""
        lowered = (reason or "").lower()
        if "certificate required" in lowered or "handshake failure" in lowered:
            return ERROR, f"TLS: the broker requires a client certificate it accepts ({reason})"
        if "certificate" in lowered or "alert" in lowered:
            return ERROR, f"TLS: the broker refused the connection ({reason})"
        text = "connection closed by the broker before CONNACK"
        if reason:
            text += f" ({reason})"
        if not self.config.tls and "reset" in lowered:
            text += "; does that port expect TLS?"
        return DISCONNECTED, text

    def _serve(self, client: mqtt.Client, started: float) -> None:
        """Run one connection until it ends or stop() is called."""
        sock = client.socket()
        if sock is None:
            return
        selector = self._selector
        events = selectors.EVENT_READ
        selector.register(sock, events, sock)
        try:
            self._serve_socket(client, sock, started)
        finally:
            with contextlib.suppress(KeyError, ValueError, OSError):
                selector.unregister(sock)

    def _serve_socket(self, client: mqtt.Client, sock, started: float) -> None:
        connack_deadline = started + CONNACK_TIMEOUT
        selector = self._selector
        events = selectors.EVENT_READ
        pending = getattr(sock, "pending", None)  # TLS: bytes decrypted but not yet read
        while True:
            if self._stopping.is_set():
                self._disconnect(client)
                return
            self._run_commands(client)
            if client.socket() is not sock:
                return
            timeout = 0.0 if pending is not None and pending() > 0 else TICK
            wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
            if wanted != events:
                selector.modify(sock, wanted, sock)
                events = wanted
            try:
                ready = selector.select(timeout)
            except (OSError, ValueError):
                return
            readable = writable = False
            for key, mask in ready:
                if key.data is sock:
                    readable = bool(mask & selectors.EVENT_READ)
                    writable = bool(mask & selectors.EVENT_WRITE)
                else:
                    self._drain_wake()
            now = time.monotonic()
            if readable or timeout == 0.0:
                self._last_rx = now
                for _ in range(READ_BURST):  # while messages keep coming: no select between
                    received = self._received
                    if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        return
                    if client.socket() is None:
                        return
                    if self._received == received:
                        break
                after = time.monotonic()
                if after - now > max(self._keepalive / 2, 1.0):
                    self._last_rx = after  # a callback blocked: that was not broker silence
            if (
                (writable or client.want_write())
                and client.socket() is not None
                and client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS
            ):
                return
            if client.socket() is None or client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if not self._connected and self._refusal is None and now > connack_deadline:
                self._drop_reason = f"no CONNACK within {CONNACK_TIMEOUT:.0f}s"
                return
            if now >= self._next_watch:
                self._next_watch = now + TICK
                if not self._watchdog(now):
                    return

    def _watchdog(self, now: float) -> bool:
        """Flag a silent broker; False when the connection should be given up."""
        if not self._connected:
            return True
        silence = now - self._last_rx
        keepalive = self._keepalive
        silent = keepalive > 0 and silence > 1.5 * keepalive
        with self._lock:
            s = self._status
            s.last_packet_at = time.time() - silence
            changed = s.silent != silent
            s.silent = silent
        if changed:
            if silent:
                self._logger.warning(
                    "%s: nothing received from the broker for %.0fs (keepalive %ds): "
                    "the connection may be half-open",
                    self._label,
                    silence,
                    keepalive,
                )
            else:
                self._logger.info("%s: the broker answers again", self._label)
            self._notify()
        if keepalive > 0 and silence > 2.5 * keepalive:
            self._drop_reason = f"nothing received for {silence:.0f}s (half-open connection)"
            return False
        return True

    def _disconnect(self, client: mqtt.Client) -> None:
        """Send DISCONNECT (normal disconnection) and flush it, within a second."""
        self._run_commands(client)  # acks queued before stop() still go out
        self._fail_commands()
        if not self._connected or client.socket() is None:
            return
        reason = ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection") if self._v5 else None
        client.disconnect(reason)
        deadline = time.monotonic() + 1.0
        while client.socket() is not None and time.monotonic() < deadline:
            if client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if client.socket() is not None:
                time.sleep(0.01)  # the socket buffer is full: give the broker a moment

    def _close(self, client: mqtt.Client) -> None:
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _end_connection(self) -> None:
        """Forget this connection's state; its unacknowledged publishes are reported lost."""
        lost = list(self._pending.values())
        self._pending.clear()
        self._sub_mids.clear()
        self._unsub_mids.clear()
        self._sent = {}
        self._client = None
        was_connected, self._connected = self._connected, False
        for token in lost:
            self._report(token, CONNECTION_LOST)
        if was_connected and self._stopping.is_set():
            self._set_state(STOPPED, keep_error=True)

    # -- commands from other threads ---------------------------------------------------

    def _run_commands(self, client: mqtt.Client) -> None:
        if not self._connected:
            self._fail_commands()
            return
        connection = self._status.connection
        while self._commands:
            command = self._commands.popleft()
            if command[0] == _ACK:
                _, number, mid, qos = command
                if number == connection:
                    client.ack(mid, qos)
            else:
                self._send_publish(client, command[1])
        if self._subs_dirty:
            self._reconcile(client)

    def _send_publish(self, client: mqtt.Client, message: OutboundMessage) -> None:
        try:
            info = client.publish(
                message.topic,
                message.payload,
                message.qos,
                message.retain,
                publish_properties(message.properties) if self._v5 else None,
            )
        except (ValueError, TypeError) as exc:
            self._report(message.token, f"invalid message: {exc}")
            return
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._pending[info.mid] = message.token
        elif info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            self._report(message.token, NOT_CONNECTED)
        else:
            self._report(message.token, f"{NOT_CONNECTED}: {mqtt.error_string(info.rc)}")

    def _reconcile(self, client: mqtt.Client) -> None:
        """Send the broker the difference between the desired and the sent subscriptions."""
        with self._lock:
            desired = dict(self._desired)
            self._subs_dirty = False
        removed = [f for f in self._sent if f not in desired]
        wanted = [spec for f, spec in desired.items() if self._sent.get(f) != spec]
        for start in range(0, len(removed), SUBSCRIBE_CHUNK):
            chunk = removed[start : start + SUBSCRIBE_CHUNK]
            rc, mid = client.unsubscribe(chunk)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                return
            self._unsub_mids[mid] = chunk
            for topic_filter in chunk:
                del self._sent[topic_filter]
            self._logger.info("%s: unsubscribing %s", self._label, ", ".join(chunk))
        topics = []
        for spec in wanted:
            try:
                topics.append((spec, self._subscribe_options(spec)))
            except (ValueError, AssertionError) as exc:
                with self._lock:
                    self._status.failed_subscriptions[spec.topic_filter] = f"invalid: {exc}"
                self._logger.warning(
                    "%s: not subscribing %s: %s", self._label, spec.topic_filter, exc
                )
        for start in range(0, len(topics), SUBSCRIBE_CHUNK):
            chunk = [spec for spec, _ in topics[start : start + SUBSCRIBE_CHUNK]]
            packet = [(spec.topic_filter, o) for spec, o in topics[start : start + SUBSCRIBE_CHUNK]]
            rc, mid = client.subscribe(packet)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                return
            self._sub_mids[mid] = chunk
            for s in chunk:
                self._sent[s.topic_filter] = s

    def _subscribe_options(self, spec: SubscriptionSpec) -> SubscribeOptions | int:
        """MQTT 5 subscribe options, or the bare QoS under 3.1.1; ValueError if invalid."""
        if spec.qos not in (0, 1, 2):
            raise ValueError(f"QoS must be 0, 1 or 2, not {spec.qos!r}")
        if spec.retain_handling not in (0, 1, 2):
            raise ValueError(f"retain handling must be 0, 1 or 2, not {spec.retain_handling!r}")
        if not self._v5:
            return spec.qos
        return SubscribeOptions(
            qos=spec.qos,
            noLocal=spec.no_local,
            retainAsPublished=spec.retain_as_published,
            retainHandling=spec.retain_handling,
        )

    # -- paho callbacks (network thread, inside loop_read / loop_write) ----------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            code = reason_code.value
            if code in AUTH_CODES:
                self._refusal = (AUTH_FAILED, AUTH_CODES[code])
            else:
                self._refusal = (ERROR, f"the broker refused the connection: {reason_code}")
            return
        keepalive = getattr(properties, "ServerKeepAlive", None) if properties else None
        if keepalive is not None:
            self._keepalive = keepalive
        self._connected = True
        self._connected_at = time.monotonic()
        self._sent = {}
        with self._lock:
            s = self._status
            s.connection = next(_connection_numbers)
            s.last_connected_at = s.last_packet_at = time.time()
            s.subscribed.clear()
            s.silent = False
            self._subs_dirty = True
            number = s.connection
        c = self.config
        self._logger.info(
            "%s: connected to %s:%d (MQTT %s%s%s, connection %d, session present: %s)",
            self._label,
            c.host,
            c.port,
            "5" if self._v5 else "3.1.1",
            ", TLS" if c.tls else "",
            ", WebSocket" if c.transport == "websockets" else "",
            number,
            "yes" if flags.session_present else "no",
        )
        self._logged_error = None
        self._set_state(CONNECTED, None)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if flags.is_disconnect_packet_from_server:
            text = f"the broker disconnected us: {reason_code}"
            if reason_code == 0x8E:
                text += " (another client connected with the same client id)"
            self._drop_reason = text
        elif self._drop_reason is None and self._paho_log.last_error:
            self._drop_reason = self._paho_log.last_error

    def _handle_message(self, client, userdata, msg) -> None:
        self._received += 1
        try:
            message = inbound_message(msg, self._status.connection, self._v5)
        except Exception:
            self._logger.exception("%s: cannot read a received message", self._label)
            return
        self._call(self._on_message, message)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        token = self._pending.pop(mid, None)
        if token is None:
            return
        if reason_code.is_failure:
            self._report(token, str(reason_code))
        else:
            self._report(token, None)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        specs = self._sub_mids.pop(mid, None)
        if specs is None:
            return
        refused = []
        granted = []
        with self._lock:
            s = self._status
            for spec, code in zip(specs, reason_codes, strict=False):
                topic_filter = spec.topic_filter
                if self._sent.get(topic_filter) != spec:
                    continue  # changed or removed since: a later SUBACK decides
                if code.is_failure:
                    s.subscribed.pop(topic_filter, None)
                    s.failed_subscriptions[topic_filter] = f"refused by the broker: {code}"
                    refused.append((topic_filter, str(code)))
                else:
                    s.subscribed[topic_filter] = code.value
                    s.failed_subscriptions.pop(topic_filter, None)
                    granted.append(f"{topic_filter} (QoS {code.value})")
        if granted:
            self._logger.info("%s: subscribed %s", self._label, ", ".join(granted))
        for topic_filter, reason in refused:
            self._logger.warning(
                "%s: the broker refused the subscription %s: %s", self._label, topic_filter, reason
            )
        self._notify()

    def _handle_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        filters = self._unsub_mids.pop(mid, None)
        if filters is None:
            return
        with self._lock:
            for topic_filter in filters:
                if topic_filter not in self._sent:
                    self._status.subscribed.pop(topic_filter, None)
                    if topic_filter not in self._rejected:
                        self._status.failed_subscriptions.pop(topic_filter, None)
        self._notify()


class _ConfigError(Exception):
    """Settings that cannot work (a CA or client certificate that does not load)."""


def _ignore(*args) -> None:
    return None
