"""The SQLite store: the embedded default of standalone runs.

One file holds the same tables as an Odoo database (see :mod:`.schema`), in WAL mode so that
readers never block the writer. SQLite has no LISTEN/NOTIFY: the runner polls it instead (every
few seconds; configuration changes and queued publishes are picked up at that pace). The
"one active runner" lock is an exclusive ``flock`` on ``<file>.lock``, released by the kernel
when the process dies.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import sqlite3
from collections.abc import Sequence

from .store import (
    _HISTORY_INSERT_COLUMNS,
    RunnerLock,
    Store,
    StoreConnection,
    StoredMessage,
    history_values,
    utcnow,
)

_INSERT_HISTORY = (
    f"INSERT INTO mqtt_publish_signal_history ({', '.join(_HISTORY_INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_HISTORY_INSERT_COLUMNS))})"
)


def _adapt(value):
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    return value


class SqliteConnection(StoreConnection):
    placeholder = "?"

    def execute(self, sql: str, params: Sequence = ()) -> list[tuple]:
        cursor = self.raw.execute(sql.replace("%s", "?"), [_adapt(p) for p in params])
        return cursor.fetchall() if cursor.description else []

    def insert_messages(self, messages: list[StoredMessage]) -> tuple[list[int], int]:
        now = utcnow()
        new_ids: list[int] = []
        duplicates = 0
        for message in messages:
            if message.dedup_key is not None:
                existing = self.execute(
                    "SELECT id FROM mqtt_publish_signal_history "
                    "WHERE broker_id = ? AND dedup_key = ?",
                    (message.broker_id, message.dedup_key),
                )
                if existing:
                    self.execute(
                        "UPDATE mqtt_publish_signal_history SET redelivered = 1, "
                        "write_date = ? WHERE id = ?",
                        (now, existing[0][0]),
                    )
                    duplicates += 1
                    continue
            values = [_adapt(v) for v in history_values(message, now)]
            row_id = self.raw.execute(_INSERT_HISTORY, values).lastrowid
            new_ids.append(row_id)
            if message.properties and message.properties.user_properties:
                self.raw.executemany(
                    "INSERT INTO mqtt_user_property (message_id, sequence, key, value) "
                    "VALUES (?, ?, ?, ?)",
                    [
                        (row_id, sequence, key, value)
                        for sequence, (key, value) in enumerate(message.properties.user_properties)
                    ],
                )
        self.raw.commit()
        return new_ids, duplicates


class SqliteLock(RunnerLock):
    def __init__(self, path: str):
        super().__init__()
        self.path = f"{path}.lock"
        self.handle = None

    def try_acquire(self) -> bool:
        if self.handle is not None:
            return True
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for as long as the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self.handle = handle
        return True

    def alive(self) -> bool:
        return self.handle is not None

    def wait(self, timeout: float) -> list[str]:
        self._select([], timeout)
        return []

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class SqliteStore(Store):
    """A SQLite file (created on first use)."""

    dialect = "sqlite"
    poll_interval = 2.0

    def __init__(self, path: str):
        super().__init__(os.path.abspath(path))
        self.path = os.path.abspath(path)

    def connect(self) -> SqliteConnection:
        raw = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("PRAGMA synchronous=NORMAL")
        return SqliteConnection(raw)

    def lock(self) -> SqliteLock:
        return SqliteLock(self.path)
