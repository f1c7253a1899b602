"""The PostgreSQL store: psycopg2, batched inserts, LISTEN/NOTIFY and the advisory lock.

Every connection sets TCP keepalives, so a database host that vanishes without closing the
connection is noticed within about half a minute rather than at the kernel's two hours.
The active runner holds ``pg_try_advisory_lock(LOCK_KEY)`` on a dedicated autocommit
connection that also LISTENs on the ``mqtt_listener`` channel; when that process dies, the
server drops the connection and the lock with it, and a standby runner takes it over.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import psycopg2
from psycopg2.extras import execute_values

from . import schema
from .store import (
    _HISTORY_INSERT_COLUMNS,
    RunnerLock,
    Store,
    StoreConnection,
    StoredMessage,
    history_values,
    utcnow,
)

KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}

_INSERT_HISTORY = (
    f"INSERT INTO mqtt_publish_signal_history ({', '.join(_HISTORY_INSERT_COLUMNS)}) "
    "VALUES %s ON CONFLICT (broker_id, dedup_key) DO UPDATE SET redelivered = TRUE, "
    "write_date = EXCLUDED.write_date RETURNING id, (xmax = 0) AS inserted"
)
_INSERT_PROPERTIES = "INSERT INTO mqtt_user_property (message_id, sequence, key, value) VALUES %s"


def _database_name(dsn: str) -> str:
    match = re.search(r"dbname=(\S+)", dsn) or re.search(r"/([^/?]+)(\?|$)", dsn)
    return match.group(1) if match else dsn


class PostgresConnection(StoreConnection):
    def execute(self, sql: str, params: Sequence = ()) -> list[tuple]:
        with self.raw.cursor() as cr:
            cr.execute(sql, tuple(params))
            return cr.fetchall() if cr.description else []

    def encode_binary(self, data):
        value = super().encode_binary(data)
        return None if value is None else psycopg2.Binary(value)

    def insert_messages(self, messages: list[StoredMessage]) -> tuple[list[int], int]:
        if not messages:
            return [], 0
        now = utcnow()
        values = [history_values(m, now, self.encode_binary) for m in messages]
        new_ids: list[int] = []
        properties = []
        with self.raw.cursor() as cr:
            # RETURNING yields the rows in VALUES order: one page holds the whole batch.
            rows = execute_values(cr, _INSERT_HISTORY, values, page_size=len(values), fetch=True)
            for message, (row_id, inserted) in zip(messages, rows, strict=True):
                if not inserted:
                    continue
                new_ids.append(row_id)
                if message.properties and message.properties.user_properties:
                    properties.extend(
                        (row_id, sequence, key, value)
                        for sequence, (key, value) in enumerate(message.properties.user_properties)
                    )
            if properties:
                execute_values(cr, _INSERT_PROPERTIES, properties, page_size=len(properties))
        self.raw.commit()
        return new_ids, len(messages) - len(new_ids)


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
        self._drop()  # closing the session releases the advisory lock


class PostgresStore(Store):
    """A PostgreSQL database, given as a URL or a libpq DSN."""

    dialect = "postgresql"

    def __init__(self, dsn: str, name: str | None = None):
        super().__init__(name or _database_name(dsn))
        self.dsn = dsn

    def raw_connect(self, autocommit: bool = False):
        connection = psycopg2.connect(self.dsn, application_name="mqtt_engine", **KEEPALIVES)
        connection.autocommit = autocommit
        return connection

    def connect(self) -> PostgresConnection:
        return PostgresConnection(self.raw_connect())

    def lock(self) -> PostgresLock:
        return PostgresLock(self)
