"""The schema contract: every table and column the engine reads or writes.

In an Odoo database the addon's models own these tables (the ORM creates them); the engine only
reads and writes the columns declared here, with parameterized SQL. The addon has a test that
compares this declaration with what the ORM created, so a field renamed on one side fails a test
instead of failing in production. Standalone runs (SQLite, or PostgreSQL without Odoo) create the
same tables themselves from this declaration (:func:`create_statements`).

Types are given in Odoo's vocabulary, which maps to one PostgreSQL type each:

========== ===================== =============================================================
type       PostgreSQL            notes
========== ===================== =============================================================
id         serial primary key
char       character varying     Odoo ``fields.Char`` and ``fields.Selection`` (values are text)
text       text
integer    integer               also ``fields.Many2one`` (no foreign key in standalone mode)
float      double precision
boolean    boolean
datetime   timestamp             naive UTC, as Odoo stores it
binary     bytea                 Odoo ``fields.Binary(attachment=False)``: the column holds the
                                 *base64* of the bytes (Odoo's convention), see :mod:`.payload`
========== ===================== =============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

PG_TYPES = {
    "id": "integer",
    "char": "character varying",
    "text": "text",
    "integer": "integer",
    "float": "double precision",
    "boolean": "boolean",
    "datetime": "timestamp without time zone",
    "binary": "bytea",
}
"""The PostgreSQL ``information_schema.columns.data_type`` of each declared type."""

_PG_DDL = dict(PG_TYPES, id="serial primary key", datetime="timestamp")
_SQLITE_DDL = {
    "id": "integer primary key autoincrement",
    "char": "text",
    "text": "text",
    "integer": "integer",
    "float": "real",
    "boolean": "integer",
    "datetime": "text",
    "binary": "blob",
}

NOTIFY_CHANNEL = "mqtt_listener"
"""The LISTEN/NOTIFY channel. Payloads: ``config``, ``outbox``, ``service``."""

LOCK_KEY = 0x6D717474_6C73746E  # "mqttlstn": the per-database advisory lock of the active runner
"""``pg_try_advisory_lock`` key; advisory locks are scoped to one database by PostgreSQL."""


@dataclass(frozen=True)
class Table:
    name: str
    columns: dict[str, str]
    unique: tuple[tuple[str, ...], ...] = ()
    indexes: tuple[tuple[str, ...], ...] = ()
    partial_indexes: tuple[tuple[str, tuple[str, ...], str], ...] = ()  # (name, columns, where)


BROKER = Table(
    "mqtt_broker",
    {
        "id": "id",
        "name": "char",
        "active": "boolean",
        "enabled": "boolean",  # Start / Stop of this broker alone (False: stay disconnected)
        "company_id": "integer",
        "host": "char",
        "port": "integer",
        "transport": "char",  # tcp | websockets
        "ws_path": "char",
        "tls": "boolean",
        "tls_insecure": "boolean",
        "tls_ca_cert": "text",  # PEM
        "tls_client_cert": "text",  # PEM
        "tls_client_key": "text",  # PEM
        "username": "char",
        "password": "char",
        "client_id": "char",
        "protocol": "char",  # 5 | 311
        "keepalive": "integer",
        "clean_start": "boolean",
        "session_expiry": "integer",  # seconds
        "receive_maximum": "integer",
        "max_payload_size": "integer",  # bytes; larger payloads are recorded as failed
        "will_topic": "char",
        "will_payload": "text",
        "will_qos": "char",  # 0 | 1 | 2
        "will_retain": "boolean",
    },
)

SUBSCRIPTION = Table(
    "mqtt_subscription",
    {
        "id": "id",
        "broker_id": "integer",
        "active": "boolean",
        "topic_filter": "char",
        "qos": "char",  # 0 | 1 | 2
        "no_local": "boolean",
        "retain_as_published": "boolean",
        "retain_handling": "char",  # 0 | 1 | 2
        "share_group": "char",
        "dedup_mode": "char",  # none | property | json
        "dedup_key": "char",  # user property name or JSON key (dotted path)
    },
    indexes=(("broker_id",),),
)

SERVICE = Table(
    "mqtt_service",
    {
        "id": "id",
        "name": "char",
        "desired_state": "char",  # running | stopped
    },
)

RUNNER = Table(
    "mqtt_runner",
    {
        "id": "id",
        "name": "char",  # host:pid, unique per runner process
        "host": "char",
        "pid": "integer",
        "mode": "char",  # threaded | prefork | standalone | engine
        "role": "char",  # active | standby
        "version": "char",
        "started_at": "datetime",
        "heartbeat_at": "datetime",
        "last_error": "text",
    },
    unique=(("name",),),
)

BROKER_STATE = Table(
    "mqtt_broker_state",
    {
        "id": "id",
        "broker_id": "integer",
        "state": "char",  # connected | connecting | disconnected | auth_failed | error | stopped
        "state_since": "datetime",
        "last_error": "text",
        "last_connected_at": "datetime",
        "last_message_at": "datetime",
        "messages_in": "integer",
        "messages_out": "integer",
        "rate_in": "float",  # messages per second, recent
        "rate_out": "float",
        "backlog": "integer",  # inbox waiting for commit + outbox queued
        "subscribed": "text",  # one "filter qos" per line, as granted by the broker
        "updated_at": "datetime",
    },
    unique=(("broker_id",),),
)

HISTORY = Table(
    "mqtt_publish_signal_history",
    {
        "id": "id",
        "create_date": "datetime",
        "write_date": "datetime",
        "broker_id": "integer",
        "subscription_id": "integer",
        "company_id": "integer",
        "direction": "char",  # in | out
        "state": "char",  # received | processed | failed | queued | sent
        "topic": "char",
        "payload": "binary",
        "payload_preview": "text",
        "payload_size": "integer",
        "payload_hash": "char",  # sha256 hex of the payload bytes
        "qos": "integer",
        "retain": "boolean",
        "redelivered": "boolean",
        "dedup_key": "char",
        "content_type": "char",
        "response_topic": "char",
        "correlation_data": "binary",
        "message_expiry": "integer",
        "payload_format": "integer",
        "error": "text",
        "attempts": "integer",
        "received_at": "datetime",
        "processed_at": "datetime",
        "sent_at": "datetime",
        "next_attempt_at": "datetime",
    },
    unique=(("broker_id", "dedup_key"),),
    indexes=(("received_at",),),
    # The outbox's work queue. Partial, so that received messages (nearly every row) cost no
    # index entry: measured, every index is PostgreSQL CPU per stored message.
    partial_indexes=(("outbox", ("broker_id", "id"), "direction = 'out' AND state = 'queued'"),),
)

USER_PROPERTY = Table(
    "mqtt_user_property",
    {
        "id": "id",
        "message_id": "integer",
        "sequence": "integer",
        "key": "char",
        "value": "text",
    },
    indexes=(("message_id",),),
)

TABLES: tuple[Table, ...] = (
    BROKER,
    SUBSCRIPTION,
    SERVICE,
    RUNNER,
    BROKER_STATE,
    HISTORY,
    USER_PROPERTY,
)


def unique_constraint_name(table: Table, columns: tuple[str, ...]) -> str:
    """The constraint name Odoo gives ``_sql_constraints`` ``(name, ...)`` on this table."""
    return f"{table.name}_{'_'.join(columns)}_uniq"


def partial_index_statements(table: Table) -> list[str]:
    """``CREATE INDEX … WHERE …`` for the partial indexes of ``table`` (Odoo's init() too)."""
    return [
        f"CREATE INDEX IF NOT EXISTS {table.name}_{name}_idx "
        f"ON {table.name} ({', '.join(columns)}) WHERE {where}"
        for name, columns, where in table.partial_indexes
    ]


def create_statements(dialect: str) -> list[str]:
    """DDL creating every table for a standalone run (``postgresql`` or ``sqlite``)."""
    ddl = _PG_DDL if dialect == "postgresql" else _SQLITE_DDL
    statements = []
    for table in TABLES:
        columns = [f'"{name}" {ddl[kind]}' for name, kind in table.columns.items()]
        for unique in table.unique:
            columns.append(
                f"CONSTRAINT {unique_constraint_name(table, unique)} UNIQUE ({', '.join(unique)})"
            )
        statements.append(f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(columns)})")
        for index in table.indexes:
            statements.append(
                f"CREATE INDEX IF NOT EXISTS {table.name}_{'_'.join(index)}_idx "
                f"ON {table.name} ({', '.join(index)})"
            )
        statements.extend(partial_index_statements(table))
    return statements
