"""The store: every SQL statement the engine runs, for PostgreSQL and SQLite alike.

A :class:`Store` stands for one database. It hands out :class:`StoreConnection` objects (one
per thread that needs one: the control loop, each broker's writer) and the :class:`RunnerLock`
that makes one runner active per database. The SQL is written once, with ``%s`` placeholders;
the SQLite store rewrites them. Only the columns declared in :mod:`.schema` are touched.

Timestamps are naive UTC ``datetime`` values, as Odoo stores them; the engine computes them
itself, so both databases see the same values.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as dt
import os
import select
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from . import schema
from .config import DesiredState, broker_from_row, subscription_from_row
from .payload import from_column, to_column
from .session import MessageProperties


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def utc_from_timestamp(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.timezone.utc).replace(tzinfo=None)


@dataclass(slots=True)
class StoredMessage:
    """One ``mqtt_publish_signal_history`` row to insert (an inbound message, prepared)."""

    broker_id: int
    subscription_id: int | None
    company_id: int | None
    state: str  # received | failed
    topic: str
    payload: bytes | None  # the column value (base64), None when not kept (oversize)
    payload_preview: str
    payload_size: int
    payload_hash: str
    qos: int
    retain: bool
    redelivered: bool
    dedup_key: str | None
    error: str | None
    received_at: float  # epoch seconds, as received
    properties: MessageProperties | None = None


@dataclass(slots=True)
class OutboxRow:
    """A queued outbound message read from the history table."""

    id: int
    topic: str
    payload: bytes  # decoded bytes
    qos: int
    retain: bool
    attempts: int
    properties: MessageProperties | None


_HISTORY_INSERT_COLUMNS = (
    "create_date",
    "write_date",
    "direction",
    "broker_id",
    "subscription_id",
    "company_id",
    "state",
    "topic",
    "payload",
    "payload_preview",
    "payload_size",
    "payload_hash",
    "qos",
    "retain",
    "redelivered",
    "dedup_key",
    "content_type",
    "response_topic",
    "correlation_data",
    "message_expiry",
    "payload_format",
    "error",
    "attempts",
    "received_at",
)

_BROKER_COLUMNS = tuple(schema.BROKER.columns)
_SUBSCRIPTION_COLUMNS = tuple(schema.SUBSCRIPTION.columns)


def history_values(message: StoredMessage, now: dt.datetime) -> tuple:
    """The values of one history row, in :data:`_HISTORY_INSERT_COLUMNS` order."""
    props = message.properties
    return (
        now,
        now,
        "in",
        message.broker_id,
        message.subscription_id,
        message.company_id,
        message.state,
        message.topic,
        message.payload,
        message.payload_preview,
        message.payload_size,
        message.payload_hash,
        message.qos,
        message.retain,
        message.redelivered,
        message.dedup_key,
        props.content_type if props else None,
        props.response_topic if props else None,
        to_column(props.correlation_data) if props else None,
        props.message_expiry if props else None,
        props.payload_format if props else None,
        message.error,
        0,
        utc_from_timestamp(message.received_at),
    )


class StoreConnection(abc.ABC):
    """One database connection and the statements the engine runs on it."""

    placeholder = "%s"

    def __init__(self, raw):
        self.raw = raw

    # -- plumbing, per dialect -------------------------------------------------------------
    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """Run one statement in the current transaction; return its rows (if any)."""

    def commit(self) -> None:
        self.raw.commit()

    def rollback(self) -> None:
        self.raw.rollback()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()

    @abc.abstractmethod
    def insert_messages(self, messages: list[StoredMessage]) -> tuple[list[int], int]:
        """Insert history rows (dedup keys already unique within the list) in one transaction.

        Returns the ids of the rows that are new, and how many were already stored (same
        broker and dedup key: the existing row is flagged redelivered). Commits.
        """

    # -- desired state ---------------------------------------------------------------------
    def load_desired(self) -> DesiredState:
        rows = self.execute("SELECT desired_state FROM mqtt_service ORDER BY id LIMIT 1")
        running = not rows or (rows[0][0] or "running") == "running"
        brokers = tuple(
            broker_from_row(dict(zip(_BROKER_COLUMNS, row, strict=True)))
            for row in self.execute(
                f"SELECT {', '.join(_BROKER_COLUMNS)} FROM mqtt_broker "
                "WHERE active AND enabled ORDER BY id"
            )
        )
        columns = ", ".join(f"s.{c}" for c in _SUBSCRIPTION_COLUMNS)
        subscriptions = tuple(
            subscription_from_row(dict(zip(_SUBSCRIPTION_COLUMNS, row, strict=True)))
            for row in self.execute(
                f"SELECT {columns} FROM mqtt_subscription s "
                "JOIN mqtt_broker b ON b.id = s.broker_id "
                "WHERE s.active AND b.active ORDER BY s.id"
            )
        )
        self.rollback()  # end the read transaction: the next read sees new commits
        return DesiredState(running=running, brokers=brokers, subscriptions=subscriptions)

    # -- outbox -----------------------------------------------------------------------------
    def fetch_outbox(self, broker_id: int, limit: int, exclude: Iterable[int]) -> list[OutboxRow]:
        """Queued outbound rows of one broker that are due, oldest first."""
        excluded = set(exclude)
        rows = self.execute(
            "SELECT id, topic, payload, qos, retain, attempts, content_type, response_topic, "
            "correlation_data, message_expiry, payload_format FROM mqtt_publish_signal_history "
            "WHERE direction = 'out' AND state = 'queued' AND broker_id = %s "
            "AND (next_attempt_at IS NULL OR next_attempt_at <= %s) ORDER BY id LIMIT %s",
            (broker_id, utcnow(), limit + len(excluded)),
        )
        rows = [row for row in rows if row[0] not in excluded][:limit]
        user_props: dict[int, list[tuple[str, str]]] = {}
        if rows:
            ids = [row[0] for row in rows]
            marks = ", ".join([self.placeholder] * len(ids))
            for message_id, key, value in self.execute(
                "SELECT message_id, key, value FROM mqtt_user_property "
                f"WHERE message_id IN ({marks}) ORDER BY message_id, sequence, id",
                ids,
            ):
                user_props.setdefault(message_id, []).append((key, value or ""))
        self.rollback()
        result = []
        for row_id, topic, payload, qos, retain, attempts, ctype, rtopic, corr, expiry, fmt in rows:
            props = MessageProperties(
                user_properties=user_props.get(row_id, []),
                content_type=ctype or None,
                response_topic=rtopic or None,
                correlation_data=from_column(corr) if corr else None,
                message_expiry=expiry or None,
                payload_format=fmt,
            )
            result.append(
                OutboxRow(
                    id=row_id,
                    topic=topic or "",
                    payload=from_column(payload) if payload else b"",
                    qos=int(qos or 0),
                    retain=bool(retain),
                    attempts=int(attempts or 0),
                    properties=props,
                )
            )
        return result

    def mark_sent(self, ids: list[int]) -> None:
        if not ids:
            return
        now = utcnow()
        marks = ", ".join([self.placeholder] * len(ids))
        self.execute(
            "UPDATE mqtt_publish_signal_history SET state = 'sent', sent_at = %s, "
            "write_date = %s, error = NULL, attempts = COALESCE(attempts, 0) + 1 "
            f"WHERE id IN ({marks}) AND state = 'queued'",
            [now, now, *ids],
        )
        self.commit()

    def mark_publish_failed(self, row_id: int, error: str, retry_at: dt.datetime | None) -> None:
        """Record a failed attempt: retried at ``retry_at``, or failed for good if None."""
        self.execute(
            "UPDATE mqtt_publish_signal_history SET state = %s, error = %s, "
            "next_attempt_at = %s, write_date = %s, attempts = COALESCE(attempts, 0) + 1 "
            "WHERE id = %s AND state = 'queued'",
            ("queued" if retry_at else "failed", error, retry_at, utcnow(), row_id),
        )
        self.commit()

    def count_queued(self) -> dict[int, int]:
        rows = self.execute(
            "SELECT broker_id, COUNT(*) FROM mqtt_publish_signal_history "
            "WHERE direction = 'out' AND state = 'queued' GROUP BY broker_id"
        )
        self.rollback()
        return dict(rows)

    def active_broker_ids(self) -> list[int]:
        rows = self.execute("SELECT id FROM mqtt_broker WHERE active ORDER BY id")
        self.rollback()
        return [row[0] for row in rows]

    # -- actual state -----------------------------------------------------------------------
    def write_broker_states(self, states: list[dict]) -> None:
        """Upsert one ``mqtt_broker_state`` row per broker (keys: the table's columns)."""
        if not states:
            return
        columns = [c for c in schema.BROKER_STATE.columns if c != "id"]
        marks = ", ".join([self.placeholder] * len(columns))
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "broker_id")
        sql = (
            f"INSERT INTO mqtt_broker_state ({', '.join(columns)}) VALUES ({marks}) "
            f"ON CONFLICT (broker_id) DO UPDATE SET {updates}"
        )
        for state in states:
            self.execute(sql, [state.get(c) for c in columns])
        self.commit()

    def clear_broker_states(self, keep: Iterable[int]) -> None:
        """Drop the state rows of brokers this runner no longer serves."""
        keep = list(keep)
        if keep:
            marks = ", ".join([self.placeholder] * len(keep))
            self.execute(f"DELETE FROM mqtt_broker_state WHERE broker_id NOT IN ({marks})", keep)
        else:
            self.execute("DELETE FROM mqtt_broker_state")
        self.commit()

    def write_runner(self, runner: dict) -> None:
        """Upsert this runner's ``mqtt_runner`` row (keys: the table's columns but id)."""
        columns = [c for c in schema.RUNNER.columns if c != "id" and c in runner]
        marks = ", ".join([self.placeholder] * len(columns))
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "name")
        self.execute(
            f"INSERT INTO mqtt_runner ({', '.join(columns)}) VALUES ({marks}) "
            f"ON CONFLICT (name) DO UPDATE SET {updates}",
            [runner[c] for c in columns],
        )
        self.commit()

    def claim_active(self, name: str) -> None:
        """Drop other runners' "active" rows: we hold the lock, so they are dead."""
        self.execute("DELETE FROM mqtt_runner WHERE role = 'active' AND name <> %s", (name,))
        self.commit()

    def delete_runner(self, name: str, stale_before: dt.datetime | None = None) -> None:
        """Remove this runner's row, and rows of runners silent since ``stale_before``."""
        self.execute("DELETE FROM mqtt_runner WHERE name = %s", (name,))
        if stale_before is not None:
            self.execute("DELETE FROM mqtt_runner WHERE heartbeat_at < %s", (stale_before,))
        self.commit()


class RunnerLock(abc.ABC):
    """The per-database lock that makes one runner active; see :meth:`try_acquire`."""

    def __init__(self):
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    def _select(self, sources: list, timeout: float) -> list:
        """Wait until one of ``sources`` is readable, :meth:`interrupt` or ``timeout``."""
        readable, _, _ = select.select([*sources, self._wake_read], [], [], timeout)
        if self._wake_read in readable:
            try:
                while os.read(self._wake_read, 512):
                    pass
            except BlockingIOError:
                pass
        return [source for source in readable if source is not self._wake_read]

    @abc.abstractmethod
    def try_acquire(self) -> bool:
        """Take the lock if free; True when this runner holds it (now or already)."""

    @abc.abstractmethod
    def alive(self) -> bool:
        """Whether the lock is still held (its connection alive)."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> list[str]:
        """Sleep up to ``timeout`` seconds or until notified; returns the notify payloads."""

    @abc.abstractmethod
    def release(self) -> None:
        """Give the lock up (closing its connection)."""

    def interrupt(self) -> None:
        """Wake a :meth:`wait` from another thread (used at shutdown)."""
        with contextlib.suppress(BlockingIOError):  # full pipe: a wake-up is pending already
            os.write(self._wake_write, b"x")


class Store(abc.ABC):
    """One database the engine serves."""

    dialect = ""

    def __init__(self, name: str):
        self.name = name

    @abc.abstractmethod
    def connect(self) -> StoreConnection:
        """A new connection (one per thread)."""

    @abc.abstractmethod
    def lock(self) -> RunnerLock:
        """A new, not yet acquired, runner lock."""

    def create_schema(self) -> None:
        """Create the engine's tables if missing (standalone runs only, never in Odoo)."""
        connection = self.connect()
        try:
            for statement in schema.create_statements(self.dialect):
                connection.execute(statement)
            connection.commit()
        finally:
            connection.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def open_store(url: str) -> Store:
    """A store from a URL: ``postgresql://…`` (or a libpq DSN), ``sqlite:///path`` or a path."""
    if url.startswith(("postgres://", "postgresql://")) or "dbname=" in url:
        from .store_pg import PostgresStore

        return PostgresStore(url)
    from .store_sqlite import SqliteStore

    # SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute/path.db
    return SqliteStore(url[len("sqlite:///") :] if url.startswith("sqlite:///") else url)
