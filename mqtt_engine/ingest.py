"""Ingest: from a broker session into the database, acknowledging only what is committed.

Per broker, one writer thread with its own database connection:

1. the session's network thread calls :meth:`BrokerPipeline.offer` for every PUBLISH; it only
   appends to a bounded inbox (by count and by bytes). When the inbox is full, ``offer`` blocks,
   paho stops reading the socket, and the broker holds the rest: intake slows, memory does not
   grow, nothing is dropped;
2. the writer takes a batch (up to ``max_batch`` messages, or what arrived within ``window``
   seconds of the first one), prepares the rows (preview, hash, dedup key, the subscription it
   belongs to; a message that cannot be prepared becomes a *failed* row with the reason), and
   inserts them in one transaction;
3. after the COMMIT, it acknowledges the batch to the broker in the order received. If the
   database is down, the batch is retried (with backoff) until it commits; nothing is
   acknowledged before. If the connection to the broker dropped meanwhile, the stale
   acknowledgements are skipped and the broker redelivers: the dedup key makes those
   redeliveries one row, and without one they are stored again flagged *redelivered*.

The same thread serves the broker's outbox (:mod:`.outbox`), so each broker has exactly one
database connection in the engine.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from . import payload as payload_tools
from .config import BrokerConfig, SubscriptionConfig
from .session import InboundMessage, Session
from .store import Store, StoreConnection, StoredMessage
from .topics import FilterSet, TopicError

_logger = logging.getLogger(__name__)

OnStored = Callable[[int, list[int]], None]  # broker id, ids of the new history rows


class Inbox:
    """A bounded FIFO from one producer (the network thread) to one consumer (the writer).

    Bounded by count and by bytes. The producer's path takes no lock: it appends to a deque
    (atomic) and counts the bytes it added, the consumer counts the bytes it took, and their
    difference is what the inbox holds. The lock and its condition serve only to wait: the
    writer for a first message or a full batch, the producer while the inbox is full. The
    producer wakes the writer only when what the writer waits for is there, not once per
    message.
    """

    def __init__(self, max_messages: int, max_bytes: int):
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._items: collections.deque[InboundMessage] = collections.deque()
        self._bytes_in = 0  # written by the producer only
        self._bytes_out = 0  # written by the consumer only
        self._closed = False
        self._wakeups = 0
        self._wanted = 0  # how many messages the waiting writer needs; 0: it does not wait
        self._blocked = False  # the producer waits for room (it is full before a whole batch)
        self._condition = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def _full(self, size: int) -> bool:
        return bool(self._items) and (
            len(self._items) >= self.max_messages
            or self._bytes_in - self._bytes_out + size > self.max_bytes
        )

    def put(self, message: InboundMessage) -> bool:
        """Append, waiting while full; False once the inbox is closed.

        A put racing with :meth:`close` may still be accepted: it is then discarded with the
        rest by :meth:`clear`, unacknowledged, and the broker redelivers it.
        """
        size = len(message.payload)
        if self._closed:
            return False
        if self._full(size):
            with self._condition:
                while not self._closed and self._full(size):
                    self._blocked = True  # a writer in its batch window takes what there is
                    self._condition.notify_all()
                    self._condition.wait(0.5)
                self._blocked = False
                if self._closed:
                    return False
        self._items.append(message)
        self._bytes_in += size
        wanted = self._wanted  # read after the append: see _wait
        if wanted and len(self._items) >= wanted:
            with self._condition:
                self._condition.notify_all()
        return True

    def wake(self) -> None:
        """Make a waiting :meth:`take` return early (outbox work, shutdown)."""
        with self._condition:
            self._wakeups += 1
            self._condition.notify_all()

    def take(self, max_count: int, window: float, idle: float) -> list[InboundMessage]:
        """A batch: wait up to ``idle`` for a first message, then up to ``window`` for more.

        The window ends early when ``max_count`` messages are there, or when the inbox is full
        before that (by bytes: large payloads) and the producer waits for room.
        """
        items = self._items
        with self._condition:
            wakeups = self._wakeups
            deadline = time.monotonic() + idle
            while not items and not self._closed and self._wakeups == wakeups:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._wait(1, remaining)
            if items and len(items) < max_count:
                deadline = time.monotonic() + window
                while len(items) < max_count and not self._closed and not self._blocked:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wait(max_count, remaining)
            batch = []
            taken = 0
            while items and len(batch) < max_count:
                message = items.popleft()
                taken += len(message.payload)
                batch.append(message)
            self._bytes_out += taken
            self._condition.notify_all()  # a producer waiting for room
            return batch

    def _wait(self, wanted: int, timeout: float) -> None:
        """Wait (lock held) until ``wanted`` messages are queued, a wake-up, or ``timeout``.

        The count is checked again after ``_wanted`` is set: a producer that appended before
        that is seen here, one that appended after it sees ``_wanted`` and notifies.
        """
        self._wanted = wanted
        try:
            if len(self._items) < wanted and not self._blocked:
                self._condition.wait(timeout)
        finally:
            self._wanted = 0

    def clear(self) -> int:
        with self._condition:
            count = len(self._items)
            self._items.clear()
            self._bytes_out = self._bytes_in
            self._condition.notify_all()
            return count

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()


def _clean_text(value: str) -> str:
    """PostgreSQL text cannot hold NUL; MQTT forbids it in strings, but a peer may send it."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


class MessagePreparer:
    """Turns received messages into history rows; never raises for a message's content."""

    def __init__(self, broker: BrokerConfig):
        self.broker = broker
        self._matching: tuple[FilterSet[SubscriptionConfig], dict] = (FilterSet(), {})

    def _subscription_of(self, topic: str) -> SubscriptionConfig | None:
        """The first subscription matching ``topic``; remembered, topics repeat a lot."""
        matcher, cache = self._matching  # one read: a matcher and the cache made for it
        if topic in cache:
            return cache[topic]
        matches = matcher.match(topic)
        if len(cache) >= 10_000:
            cache.clear()
        cache[topic] = found = matches[0] if matches else None
        return found

    def set_subscriptions(self, subscriptions: tuple[SubscriptionConfig, ...]) -> None:
        matcher: FilterSet[SubscriptionConfig] = FilterSet()
        for subscription in subscriptions:
            try:
                matcher.add(subscription.broker_filter, subscription)
            except TopicError as exc:  # the broker refuses it too; its messages never come
                _logger.warning("%s: subscription %s: %s", self.broker.name, subscription.id, exc)
        self._matching = (matcher, {})  # one assignment: the writer sees old or new, whole

    def prepare(self, message: InboundMessage) -> StoredMessage:
        data = message.payload
        size = len(data)
        props = message.properties
        if props is not None:
            if props.user_properties:
                props.user_properties = [
                    (_clean_text(k), _clean_text(v)) for k, v in props.user_properties
                ]
            if props.content_type:
                props.content_type = _clean_text(props.content_type)
            if props.response_topic:
                props.response_topic = _clean_text(props.response_topic)
        error = None
        subscription = None
        topic = message.topic
        if topic is None:
            topic = message.topic_raw.decode("utf-8", "replace") or "(undecodable topic)"
            error = message.topic_error or "topic is not valid UTF-8"
        else:
            subscription = self._subscription_of(topic)
        topic = _clean_text(topic)
        dedup_key = None
        if size > self.broker.max_payload_size:
            error = (
                f"payload of {size:,} bytes is above this broker's limit of "
                f"{self.broker.max_payload_size:,} bytes: not kept (size and SHA-256 recorded)"
            )
            stored_payload = None
            preview = f"(not kept: {size:,} bytes, above the limit)"
        else:
            stored_payload = payload_tools.to_column(data)
            preview = payload_tools.preview(data)
            if error is None and props is not None and props.payload_format == 1:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    error = (
                        "payload format indicator says UTF-8, but byte "
                        f"0x{data[exc.start]:02x} at position {exc.start} is not valid UTF-8"
                    )
            if error is None and subscription is not None and subscription.dedup_key:
                dedup_key, error = self._dedup_key(subscription, message)
        return StoredMessage(
            broker_id=self.broker.id,
            subscription_id=subscription.id if subscription else None,
            company_id=self.broker.company_id,
            state="failed" if error else "received",
            topic=topic,
            payload=stored_payload,
            payload_preview=preview,
            payload_size=size,
            payload_hash=payload_tools.sha256_hex(data),
            qos=message.qos,
            retain=message.retain,
            redelivered=message.dup,
            dedup_key=dedup_key,
            error=error,
            received_at=message.received_at,
            properties=props,
        )

    @staticmethod
    def _dedup_key(
        subscription: SubscriptionConfig, message: InboundMessage
    ) -> tuple[str | None, str | None]:
        """(dedup key, error) for a message of ``subscription``."""
        name = subscription.dedup_key
        if subscription.dedup_mode == "property" and name:
            for key, value in message.properties.user_properties if message.properties else ():
                if key == name:
                    return value, None
            return None, f"dedup key: user property {name!r} missing"
        if subscription.dedup_mode == "json" and name:
            try:
                return payload_tools.json_value(message.payload, name), None
            except payload_tools.PayloadError as exc:
                return None, f"dedup key: {exc}"
        return None, None


class BrokerPipeline:
    """Inbox, writer thread and outbox of one broker; see the module docstring."""

    def __init__(
        self,
        store: Store,
        broker: BrokerConfig,
        *,
        max_batch: int = 2000,
        window: float = 0.01,
        inbox_messages: int = 20000,
        inbox_bytes: int = 64 * 1024 * 1024,
        on_stored: OnStored | None = None,
        outbox_limit: int = 100,
        logger: logging.Logger | None = None,
    ):
        from .outbox import Outbox

        self.store = store
        self.broker = broker
        self.max_batch = max_batch
        self.window = window
        self.inbox = Inbox(inbox_messages, max(inbox_bytes, broker.max_payload_size * 2))
        self.preparer = MessagePreparer(broker)
        self.on_stored = on_stored
        self.logger = logger or _logger
        self.session: Session | None = None
        self.outbox = Outbox(self, limit=outbox_limit)
        self.stored = 0
        self.last_message_at: float | None = None
        self.last_error: str | None = None
        self._connection: StoreConnection | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-writer-{store.name}-{broker.id}", daemon=True
        )

    # -- called from the session's network thread ---------------------------------------------
    def offer(self, message: InboundMessage) -> None:
        """``on_message`` of the session: queue, blocking while the inbox is full."""
        self.inbox.put(message)

    def published(self, token: int, error: str | None) -> None:
        """``on_published`` of the session."""
        self.outbox.completed(token, error)
        self.inbox.wake()

    # -- life ---------------------------------------------------------------------------------
    def attach(self, session: Session) -> None:
        self.session = session

    def set_subscriptions(self, subscriptions: tuple[SubscriptionConfig, ...]) -> None:
        self.preparer.set_subscriptions(subscriptions)

    def start(self) -> None:
        self._thread.start()

    def wake_outbox(self) -> None:
        self.outbox.due = True
        self.inbox.wake()

    def stop(self, timeout: float = 10.0) -> None:
        """End the writer; what it has not committed is not acknowledged (redelivered later)."""
        self._stop.set()
        self.inbox.close()
        self._thread.join(timeout)
        dropped = self.inbox.clear()
        if dropped:
            self.logger.info(
                "%s: %d received messages left uncommitted at stop; the broker redelivers them",
                self.broker.name,
                dropped,
            )
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    @property
    def backlog(self) -> int:
        return len(self.inbox) + self.outbox.queued

    # -- the writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        threading.current_thread().dbname = self.store.name  # shown by Odoo's log format
        backoff = 0.5
        batch: list[InboundMessage] = []
        while not self._stop.is_set():
            try:
                if self._connection is None:
                    self._connection = self.store.connect()
                    if self.last_error:
                        self.logger.info("%s: database reachable again", self.broker.name)
                    self.last_error = None
                if not batch:
                    batch = self.inbox.take(self.max_batch, self.window, idle=0.5)
                if batch:
                    self._write(batch)
                    batch = []
                self.outbox.pump(self._connection)
                backoff = 0.5
            except Exception as exc:  # the loop must not die: log, back off, go round again
                self.last_error = f"database: {exc}".strip()
                self.logger.warning(
                    "%s: writing to the database failed (%s); %d messages wait, retry in %.1fs",
                    self.broker.name,
                    str(exc).strip() or type(exc).__name__,
                    len(batch) + len(self.inbox),
                    backoff,
                )
                if self._connection is not None:
                    self._connection.close()
                    self._connection = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _write(self, batch: list[InboundMessage]) -> None:
        rows = []
        seen: set[str] = set()
        for message in batch:
            row = self.preparer.prepare(message)
            if row.dedup_key is not None:
                if row.dedup_key in seen:
                    continue
                seen.add(row.dedup_key)
            rows.append(row)
        new_ids, _already_stored = self._connection.insert_messages(rows)
        # Committed: now, and only now, the broker may forget these messages.
        if self.session is not None:
            self.session.ack(batch)
        self.stored += len(new_ids)
        self.last_message_at = batch[-1].received_at
        if self.on_stored is not None and new_ids:
            try:
                self.on_stored(self.broker.id, new_ids)
            except Exception:
                self.logger.exception("%s: the on_stored callback failed", self.broker.name)
