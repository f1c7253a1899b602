"""The PostgreSQL store: psycopg2, batched inserts, LISTEN/NOTIFY and the advisory lock.

Every connection sets TCP keepalives, so a database host that vanishes without closing the
connection is noticed within about half a minute rather than at the kernel's two hours.
The active runner holds ``pg_try_advisory_lock(LOCK_KEY)`` on a dedicated autocommit
connection that also LISTENs on the ``mqtt_listener`` channel; when that process dies, the
server drops the connection and the lock with it, and a standby runner takes it over.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from collections.abc import Sequence

import psycopg2
import psycopg2.errors
from psycopg2.extensions import parse_dsn

from . import schema
from .payload import to_column
from .session import MessageProperties
from .store import (
    _HISTORY_INSERT_COLUMNS,
    RunnerLock,
    Store,
    StoreConnection,
    StoredMessage,
    utcnow,
)

# libpq options of every engine connection, so that a database that vanished without closing
# the connection (a host gone, a partition) is noticed in seconds: TCP keepalives for an idle
# connection, tcp_user_timeout (ms) for one waiting on an answer (a COPY, a commit, an unlock),
# which keepalives do not cover once sent data goes unacknowledged. A DSN may set its own.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}

# Per-message columns go through COPY into a temporary stage table; the columns every row of a
# batch shares (dates, direction, broker, company) are parameters of the INSERT that follows.
_BATCH_COLUMNS = ("create_date", "write_date", "direction", "broker_id", "company_id", "attempts")
_STAGE_COLUMNS = (
    "id",
    *(c for c in _HISTORY_INSERT_COLUMNS if c not in _BATCH_COLUMNS and c != "received_at"),
    "received_epoch",
)
_CREATE_STAGE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS mqtt_ingest_stage ("
    "id integer, subscription_id integer, state varchar, topic varchar, payload bytea, "
    "payload_preview text, payload_size integer, payload_hash varchar, qos integer, "
    "retain boolean, redelivered boolean, dedup_key varchar, content_type varchar, "
    "response_topic varchar, correlation_data bytea, message_expiry integer, "
    "payload_format integer, error text, received_epoch double precision"
    ") ON COMMIT DELETE ROWS"
)
_STAGED = [c for c in _STAGE_COLUMNS if c != "received_epoch"]
_INSERT_FROM_STAGE = (
    "INSERT INTO mqtt_publish_signal_history (create_date, write_date, direction, broker_id, "
    f"company_id, attempts, received_at, {', '.join(_STAGED)}) "
    "SELECT %(now)s, %(now)s, 'in', %(broker)s, %(company)s, 0, "
    "to_timestamp(received_epoch) AT TIME ZONE 'UTC', "
    f"{', '.join(_STAGED)} FROM mqtt_ingest_stage "
    "ON CONFLICT (broker_id, dedup_key) DO UPDATE SET redelivered = TRUE, "
    "write_date = EXCLUDED.write_date RETURNING id"
)
_COPY_HISTORY = (
    f"COPY mqtt_publish_signal_history ({', '.join(_STAGED)}, received_at, "
    f"{', '.join(_BATCH_COLUMNS)}) FROM STDIN"
)
_COPY_CHUNK = 1 << 20  # characters psycopg2 reads from the batch at a time (default 8 KiB)
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str | None) -> str:
    """A text value in COPY's text format (NUL is cleaned before, see ingest)."""
    if value is None:
        return "\\N"
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


def _copy_bytes(value: bytes | None) -> str:
    return "\\N" if value is None else "\\\\x" + value.hex()


def _copy_number(value) -> str:
    return "\\N" if value is None else str(value)


_NO_PROPERTY_COLUMNS = "\t".join(["\\N"] * 5)  # content type … payload format, all NULL
_last_second: tuple[int, str] = (-1, "")  # (epoch second, its text): messages share seconds


def _copy_timestamp(epoch: float) -> str:
    """A naive UTC timestamp in COPY's text format, from epoch seconds (no datetime made)."""
    global _last_second
    seconds = int(epoch)
    cached, text = _last_second  # one read of one tuple: safe beside other writer threads
    if cached != seconds:
        text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    return f"{text}.{int((epoch - seconds) * 1e6):06d}"


def _property_columns(props: MessageProperties | None) -> str:
    """Content type, response topic, correlation data, expiry, payload format: COPY text."""
    if props is None or (
        props.content_type is None
        and props.response_topic is None
        and props.correlation_data is None
        and props.message_expiry is None
        and props.payload_format is None
    ):
        return _NO_PROPERTY_COLUMNS
    return "\t".join(
        (
            _copy_text(props.content_type),
            _copy_text(props.response_topic),
            _copy_bytes(to_column(props.correlation_data)),
            _copy_number(props.message_expiry),
            _copy_number(props.payload_format),
        )
    )


def _core_line(row_id: int, m: StoredMessage) -> str:
    """The per-message columns of a row (``_STAGED`` order) in COPY's text format."""
    return (
        f"{row_id}\t{_copy_number(m.subscription_id)}\t{m.state}\t{_copy_text(m.topic)}\t"
        f"{_copy_bytes(m.payload)}\t{_copy_text(m.payload_preview)}\t{m.payload_size}\t"
        f"{m.payload_hash}\t{m.qos}\t{'t' if m.retain else 'f'}\t"
        f"{'t' if m.redelivered else 'f'}\t{_copy_text(m.dedup_key)}\t"
        f"{_property_columns(m.properties)}\t{_copy_text(m.error)}"
    )


def _database_name(dsn: str) -> str:
    match = re.search(r"dbname=(\S+)", dsn) or re.search(r"/([^/?]+)(\?|$)", dsn)
    return match.group(1) if match else dsn


class PostgresConnection(StoreConnection):
    _stage_ready = False
    _sequence = None

    def execute(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self.raw.cursor() as cr:
            cr.execute(sql, tuple(params))
            return cr.fetchall() if cr.description else []

    def insert_messages(self, messages: list[StoredMessage]) -> tuple[list[int], int]:
        """Insert a batch by COPY, in one transaction.

        The ids are taken from the table's sequence first. The batch is COPYed straight into
        the history table; if a row meets an existing dedup key (a redelivery: rare, after a
        crash or a reconnect), that transaction is rolled back and the batch goes through a
        temporary stage table and one ``INSERT … ON CONFLICT`` instead, which flags the
        existing rows redelivered. Which rows are new is known exactly either way (a row that
        met its key comes back with the existing row's id), without relying on RETURNING's order.
        """
        if not messages:
            return [], 0
        with self.raw.cursor() as cr:
            if self._sequence is None:
                cr.execute("SELECT pg_get_serial_sequence('mqtt_publish_signal_history', 'id')")
                self._sequence = cr.fetchone()[0]
            cr.execute(
                "SELECT nextval(%s) FROM generate_series(1, %s)", (self._sequence, len(messages))
            )
            ids = [row[0] for row in cr.fetchall()]
            cores = [_core_line(row_id, m) for row_id, m in zip(ids, messages, strict=True)]
        first = messages[0]
        now = utcnow()
        try:
            with self.raw.cursor() as cr:
                batch = "\t".join(
                    (
                        now.isoformat(sep=" "),
                        now.isoformat(sep=" "),
                        "in",
                        str(first.broker_id),
                        _copy_number(first.company_id),
                        "0",
                    )
                )
                lines = [
                    f"{core}\t{_copy_timestamp(m.received_at)}\t{batch}"
                    for core, m in zip(cores, messages, strict=True)
                ]
                data = "\n".join(lines) + "\n"
                cr.copy_expert(_COPY_HISTORY, io.StringIO(data), size=_COPY_CHUNK)
                new_ids = ids
                self._copy_properties(cr, ids, messages, set(ids))
            self.raw.commit()
            return new_ids, 0
        except psycopg2.errors.UniqueViolation:
            self.raw.rollback()  # a redelivery among them: the stage and ON CONFLICT way
        with self.raw.cursor() as cr:
            if not self._stage_ready:
                cr.execute(_CREATE_STAGE)
                self._stage_ready = True
            lines = [f"{core}\t{m.received_at!r}" for core, m in zip(cores, messages, strict=True)]
            cr.copy_expert(
                f"COPY mqtt_ingest_stage ({', '.join(_STAGE_COLUMNS)}) FROM STDIN",
                io.StringIO("\n".join(lines) + "\n"),
            )
            cr.execute(
                _INSERT_FROM_STAGE,
                {"now": now, "broker": first.broker_id, "company": first.company_id},
            )
            returned = {row[0] for row in cr.fetchall()}
            new_ids = [row_id for row_id in ids if row_id in returned]
            self._copy_properties(cr, ids, messages, returned)
        self.raw.commit()
        return new_ids, len(messages) - len(new_ids)

    @staticmethod
    def _copy_properties(cr, ids: list[int], messages: list[StoredMessage], new: set) -> None:
        """COPY the user properties of the new rows among ``messages``."""
        properties = [
            f"{row_id}\t{sequence}\t{_copy_text(key)}\t{_copy_text(value)}"
            for row_id, m in zip(ids, messages, strict=True)
            if row_id in new and m.properties and m.properties.user_properties
            for sequence, (key, value) in enumerate(m.properties.user_properties)
        ]
        if properties:
            cr.copy_expert(
                "COPY mqtt_user_property (message_id, sequence, key, value) FROM STDIN",
                io.StringIO("\n".join(properties) + "\n"),
            )


class PostgresLock(RunnerLock):
    def __init__(self, store: PostgresStore):
        self.store = store
        super().__init__()
        self.connection = None

    def try_acquire(self) -> bool:
        if self.connection is not None and not self.alive():
            self._drop()
        if self.connection is None:
            self.connection = self.store.raw_connect(autocommit=True)
            with self.connection.cursor() as cr:
                cr.execute(f"LISTEN {schema.NOTIFY_CHANNEL}")
        with self.connection.cursor() as cr:
            cr.execute("SELECT pg_try_advisory_lock(%s)", (schema.LOCK_KEY,))
            return bool(cr.fetchone()[0])

    def alive(self) -> bool:
        if self.connection is None or self.connection.closed:
            return False
        try:
            with self.connection.cursor() as cr:
                cr.execute("SELECT 1")
            return True
        except psycopg2.Error:
            return False

    def wait(self, timeout: float) -> list[str]:
        if self.connection is None or self.connection.closed:
            self._select([], timeout)
            return []
        payloads = []
        if self._select([self.connection], timeout):
            self.connection.poll()  # raises OperationalError when the connection is gone
            while self.connection.notifies:
                payloads.append(self.connection.notifies.pop(0).payload)
        return payloads

    def _drop(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(psycopg2.Error):
                self.connection.close()
        self.connection = None

    def release(self) -> None:
        """Unlock, then close. Closing alone releases the lock too, but only once the server
        has ended the session, a moment later: a standby trying at once would still find it
        taken."""
        if self.connection is not None and not self.connection.closed:
            with contextlib.suppress(psycopg2.Error), self.connection.cursor() as cr:
                cr.execute("SELECT pg_advisory_unlock_all()")
        self._drop()


class PostgresStore(Store):
    """A PostgreSQL database, given as a URL or a libpq DSN."""

    dialect = "postgresql"

    def __init__(self, dsn: str, name: str | None = None):
        super().__init__(name or _database_name(dsn))
        self.dsn = dsn

    def raw_connect(self, autocommit: bool = False):
        # What the DSN sets itself wins: its application_name (the addon names its
        # connections), its keepalive or tcp_user_timeout settings.
        given = parse_dsn(self.dsn)
        defaults = {"application_name": "mqtt_engine", **KEEPALIVES}
        extra = {key: value for key, value in defaults.items() if key not in given}
        connection = psycopg2.connect(self.dsn, **extra)
        connection.autocommit = autocommit
        return connection

    def connect(self) -> PostgresConnection:
        return PostgresConnection(self.raw_connect())

    def lock(self) -> PostgresLock:
        return PostgresLock(self)
