"""Runner processes as they report themselves: one row per process that serves this database.

The engine's runner writes these rows (its heartbeat every few seconds); Odoo only reads them.
Exactly one runner is ``active`` per database, the holder of the database's advisory lock
(:data:`mqtt_engine.schema.LOCK_KEY`); the others are ``standby`` and take over when it ends.
"""

from datetime import timedelta

from odoo import fields, models

HEARTBEAT_TIMEOUT = 30
"""Seconds without a heartbeat after which a runner no longer counts as attached."""

RUNNER_MODES = [
    ("threaded", "Threaded server"),
    ("prefork", "Prefork worker"),
    ("standalone", "Standalone command"),
    ("engine", "Engine (no Odoo)"),
    ("test", "Test run"),
    ("bench", "Benchmark"),
]


class MqttRunner(models.Model):
    _name = "mqtt.runner"
    _description = "MQTT Runner"
    _order = "role, heartbeat_at desc, id desc"

    name = fields.Char(required=True, readonly=True, help="host:pid, unique per runner process.")
    host = fields.Char(readonly=True)
    pid = fields.Integer(string="PID", readonly=True)
    mode = fields.Selection(RUNNER_MODES, readonly=True)
    role = fields.Selection(
        [("active", "Active"), ("standby", "Standby")],
        readonly=True,
        help="Active: holds this database's lock and runs its brokers. Standby: waits to take "
        "over when the active runner ends.",
    )
    version = fields.Char(readonly=True)
    started_at = fields.Datetime(readonly=True)
    heartbeat_at = fields.Datetime(string="Last heartbeat", readonly=True)
    last_error = fields.Text(readonly=True)
    alive = fields.Boolean(
        compute="_compute_alive",
        search="_search_alive",
        help=f"A heartbeat arrived within the last {HEARTBEAT_TIMEOUT} seconds.",
    )

    if hasattr(models, "Constraint"):  # Odoo 19
        _name_uniq = models.Constraint("UNIQUE (name)", "A runner name is unique (host:pid).")
    else:
        _sql_constraints = [
            ("name_uniq", "UNIQUE (name)", "A runner name is unique (host:pid)."),
        ]

    def _fresh_domain(self):
        """Runners whose heartbeat is younger than :data:`HEARTBEAT_TIMEOUT`."""
        cutoff = fields.Datetime.now() - timedelta(seconds=HEARTBEAT_TIMEOUT)
        return [("heartbeat_at", ">=", cutoff)]

    def _compute_alive(self):
        cutoff = fields.Datetime.now() - timedelta(seconds=HEARTBEAT_TIMEOUT)
        for runner in self:
            runner.alive = bool(runner.heartbeat_at and runner.heartbeat_at >= cutoff)

    def _search_alive(self, operator, value):
        if operator not in ("=", "!=") or not isinstance(value, bool):
            raise NotImplementedError(operator)
        fresh = self._fresh_domain()
        if (operator == "=") == value:
            return fresh
        return ["|", ("heartbeat_at", "=", False), ("heartbeat_at", "<", fresh[0][2])]
