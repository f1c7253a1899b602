"""The outbox: publishing rows queued in the database, marked sent only when acknowledged.

Odoo (or anyone) inserts a ``mqtt_publish_signal_history`` row with ``direction = 'out'`` and
``state = 'queued'`` in its own transaction and sends ``NOTIFY mqtt_listener, 'outbox'``; NOTIFY
is delivered at commit, so a rolled-back publish is never sent. The broker's writer thread then:

- reads the due queued rows of its broker, oldest first, at most ``limit`` in flight;
- publishes them (QoS 0, 1 or 2, retain, MQTT 5 properties);
- marks a row *sent* on PUBACK (QoS 1) or PUBCOMP (QoS 2), or once written to the socket (QoS 0);
- on a refusal by the broker (a reason code of 0x80 or above) marks it *failed* with the reason;
- when the connection drops before the acknowledgement, leaves it queued: it is sent again
  after the reconnect, and after a restart of the runner (at least once).

A row whose topic is not a valid topic name is failed at once, with the reason. A row that was
in flight each of the last ``LOST_CONNECTIONS_LIMIT`` (3) times the connection dropped is failed
too: a message that makes the broker hang up (some brokers drop a client after a refused
publish) must not be sent for ever, starving the rows queued behind it.

Known limit: paho 2.x ignores the reason code of a PUBREC (eclipse-paho/paho.mqtt.python#895),
so a QoS 2 publish that the broker refuses with PUBREC (an ACL's "Not authorized", MQTT 5) is
reported as acknowledged and marked *sent*. QoS 1 refusals (PUBACK) are seen and marked
*failed*. Publish at QoS 1 to topics an ACL may refuse.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

from .session import CONNECTED, CONNECTION_LOST, TRANSIENT_PUBLISH_ERRORS, OutboundMessage
from .store import StoreConnection
from .topics import TopicError, validate_topic

if TYPE_CHECKING:
    from .ingest import BrokerPipeline

POLL_INTERVAL = 5.0  # seconds between outbox reads when nobody sends a NOTIFY
LOST_CONNECTIONS_LIMIT = 3  # a row in flight when the connection dropped that often is failed


class Outbox:
    """The outbox of one broker, driven by its writer thread (see the module docstring)."""

    def __init__(self, pipeline: BrokerPipeline, limit: int = 100):
        self.pipeline = pipeline
        self.limit = limit
        self.due = True
        self.queued = 0
        self.sent = 0
        self._in_flight: set[int] = set()
        self._lost: collections.Counter[int] = collections.Counter()  # row id -> dropped
        self._completions: collections.deque[tuple[int, str | None]] = collections.deque()
        self._last_poll = 0.0

    def completed(self, token: int, error: str | None) -> None:
        """From the network thread: a publish finished (error None: acknowledged)."""
        self._completions.append((token, error))

    def pump(self, connection: StoreConnection) -> None:
        """Record finished publishes, then send what is due; runs on the writer thread."""
        self._record_completions(connection)
        session = self.pipeline.session
        if session is None or session.status.state != CONNECTED:
            return
        now = time.monotonic()
        if not self.due and now - self._last_poll < POLL_INTERVAL:
            return
        # After a dropped connection, the rows that were in flight are suspects: each goes out
        # alone, so that the next drop is charged to the one row that was on the wire.
        isolating = bool(self._lost)
        room = (0 if self._in_flight else 1) if isolating else self.limit - len(self._in_flight)
        if room <= 0:
            return
        self.due = False
        self._last_poll = now
        limit = max(room, len(self._lost)) if isolating else room
        rows = connection.fetch_outbox(self.pipeline.broker.id, limit, self._in_flight)
        if isolating:
            suspects = [r for r in rows if r.id in self._lost]
            if not suspects:
                self._lost.clear()  # the suspects are gone (sent elsewhere, deleted)
            rows = suspects[:1] or rows[:1]
            self.due = True
        elif len(rows) == room:
            self.due = True  # more may wait: read again after this round
        for row in rows:
            try:
                validate_topic(row.topic)
            except TopicError as exc:
                connection.mark_publish_failed(row.id, f"invalid topic: {exc}", None)
                continue
            self._in_flight.add(row.id)
            session.publish(
                OutboundMessage(
                    token=row.id,
                    topic=row.topic,
                    payload=row.payload,
                    qos=row.qos,
                    retain=row.retain,
                    properties=row.properties,
                )
            )

    def _record_completions(self, connection: StoreConnection) -> None:
        sent = []
        while self._completions:
            token, error = self._completions.popleft()
            self._in_flight.discard(token)
            if error is None:
                sent.append(token)
                self._lost.pop(token, None)
            elif error.startswith(CONNECTION_LOST) and self._drop_lost(connection, token):
                continue
            elif error.startswith(TRANSIENT_PUBLISH_ERRORS):
                self.due = True  # still queued: sent again once connected
            else:
                connection.mark_publish_failed(token, f"refused by the broker: {error}", None)
        if sent:
            connection.mark_sent(sent)
            self.sent += len(sent)

    def _drop_lost(self, connection: StoreConnection, token: int) -> bool:
        """Count a dropped connection against a row in flight; fail it at the limit."""
        self._lost[token] += 1
        if self._lost[token] < LOST_CONNECTIONS_LIMIT:
            return False
        del self._lost[token]
        connection.mark_publish_failed(
            token,
            f"the broker dropped the connection {LOST_CONNECTIONS_LIMIT} times while this "
            "message was in flight (a refusal? see the broker's log); not sent again",
            None,
        )
        return True
