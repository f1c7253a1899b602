"""Standalone runs: brokers and subscriptions from a TOML file, written into the store.

The runner always reads its desired state from the database; a standalone run first writes the
file's brokers and subscriptions there (matched by broker name and topic filter, so history
rows keep pointing at the same ids from one run to the next), archives what the file no longer
lists, and switches the service on. Example ``mqtt-engine.toml``::

    database = "sqlite:///mqtt.sqlite3"    # or "postgresql://user@host/dbname"

    [[broker]]
    name = "plant"
    host = "127.0.0.1"
    port = 1883
    # protocol = "5"            # or "311"
    # username = "odoo"
    # password_env = "MQTT_PASSWORD"   # read from the environment, never from the file
    # tls = true
    # tls_ca_file = "/etc/ssl/plant-ca.pem"

    [[broker.subscription]]
    topic_filter = "sensors/#"
    qos = 1
    dedup_mode = "json"
    dedup_key = "id"
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import schema
from .store import Store
from .topics import validate_filter

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_BROKER_FIELDS = set(schema.BROKER.columns) - {"id", "active", "company_id"}
_SUBSCRIPTION_FIELDS = set(schema.SUBSCRIPTION.columns) - {"id", "broker_id", "active"}
_FILE_FIELDS = {
    "tls_ca_file": "tls_ca_cert",
    "tls_cert_file": "tls_client_cert",
    "tls_key_file": "tls_client_key",
}


class ConfigError(ValueError):
    """The standalone configuration is wrong; the message says where."""


def load_file(path: str | Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _broker_values(entry: dict, index: int) -> dict:
    where = f"broker #{index + 1} ({entry.get('name', 'unnamed')})"
    values = {}
    for key, value in entry.items():
        if key == "subscription":
            continue
        if key in _FILE_FIELDS:
            try:
                values[_FILE_FIELDS[key]] = Path(value).read_text()
            except OSError as exc:
                raise ConfigError(f"{where}: {key}: {exc}") from exc
        elif key == "password_env":
            if value not in os.environ:
                raise ConfigError(f"{where}: environment variable {value} is not set")
            values["password"] = os.environ[value]
        elif key in _BROKER_FIELDS:
            values[key] = str(value) if key in ("protocol", "will_qos") else value
        else:
            raise ConfigError(f"{where}: unknown setting {key!r}")
    if not values.get("host"):
        raise ConfigError(f"{where}: 'host' is required")
    values.setdefault("name", values["host"])
    values.setdefault("enabled", True)
    return values


def _subscription_values(entry: dict, where: str) -> dict:
    unknown = set(entry) - _SUBSCRIPTION_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    if "topic_filter" not in entry:
        raise ConfigError(f"{where}: 'topic_filter' is required")
    try:
        validate_filter(entry["topic_filter"])
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    values = dict(entry)
    for key in ("qos", "retain_handling"):
        if key in values:
            values[key] = str(values[key])
    values.setdefault("qos", "1")
    return values


def sync_to_store(store: Store, config: dict) -> int:
    """Write the file's brokers and subscriptions into ``store``; returns the broker count."""
    brokers = [_broker_values(entry, i) for i, entry in enumerate(config.get("broker", []))]
    connection = store.connect()
    try:
        execute = connection.execute
        if not execute("SELECT id FROM mqtt_service"):
            execute(
                "INSERT INTO mqtt_service (name, desired_state) VALUES (%s, %s)",
                ("MQTT service", "running"),
            )
        execute("UPDATE mqtt_service SET desired_state = 'running'")
        kept_brokers = []
        for index, values in enumerate(brokers):
            broker_id = _upsert(
                connection, "mqtt_broker", {"name": values["name"]}, {**values, "active": True}
            )
            kept_brokers.append(broker_id)
            kept_subscriptions = []
            for number, entry in enumerate(config["broker"][index].get("subscription", [])):
                where = f"broker {values['name']!r}, subscription #{number + 1}"
                sub = _subscription_values(entry, where)
                kept_subscriptions.append(
                    _upsert(
                        connection,
                        "mqtt_subscription",
                        {"broker_id": broker_id, "topic_filter": sub["topic_filter"]},
                        {**sub, "active": True},
                    )
                )
            _archive_others(
                connection, "mqtt_subscription", "broker_id", broker_id, kept_subscriptions
            )
        _archive_others(connection, "mqtt_broker", None, None, kept_brokers)
        connection.commit()
        return len(kept_brokers)
    finally:
        connection.close()


def _upsert(connection, table: str, key: dict, values: dict) -> int:
    execute = connection.execute
    where = " AND ".join(f"{c} = %s" for c in key)
    rows = execute(f"SELECT id FROM {table} WHERE {where}", list(key.values()))
    values = {**key, **values}
    if rows:
        assignments = ", ".join(f"{c} = %s" for c in values)
        execute(f"UPDATE {table} SET {assignments} WHERE id = %s", [*values.values(), rows[0][0]])
        return rows[0][0]
    columns = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(values.values()))
    return execute(f"SELECT id FROM {table} WHERE {where}", list(key.values()))[0][0]


def _archive_others(connection, table: str, parent: str | None, parent_id, keep: list[int]) -> None:
    rows = connection.execute(
        f"SELECT id FROM {table}" + (f" WHERE {parent} = %s" if parent else ""),
        [parent_id] if parent else [],
    )
    for (row_id,) in rows:
        if row_id not in keep:
            connection.execute(f"UPDATE {table} SET active = %s WHERE id = %s", (False, row_id))
