"""Every MQTT message in and out, byte-exact, with its outcome.

The engine's runner inserts received messages here in batches (one transaction per batch, the
broker's acknowledgement after the commit), and the dispatcher writes each one's outcome. The
payload column holds Odoo's base64 of the exact bytes (NUL and invalid UTF-8 included); the
preview is safe text written by the engine, the pretty JSON is computed when a form shows it.
Nothing here renders a payload as HTML.

States: ``received`` (stored, not yet handled), ``processed``, ``failed`` (with the error; kept
for a retry), ``queued`` (outgoing, waiting for the broker), ``sent`` (the broker acknowledged).

Retention: :meth:`_gc_old_messages` (daily, with Odoo's autovacuum) deletes the messages older
than ``mqtt_listener.history_days`` days (system parameter, default 30, 0 keeps everything) in
every state but ``queued``: a queued message is an outgoing message not yet delivered, and
deleting it would lose it.
"""

import logging
from datetime import timedelta

from mqtt_engine import payload as engine_payload
from mqtt_engine import schema

from odoo import api, fields, models

_logger = logging.getLogger(__name__)

HISTORY_DAYS_PARAM = "mqtt_listener.history_days"
DEFAULT_HISTORY_DAYS = 30
GC_BATCH = 10_000
GC_STATES = ("received", "processed", "failed", "sent")
PRETTY_MAX_BYTES = 1024 * 1024
"""Larger payloads show their preview only: a form is no place for megabytes of JSON."""


class MqttPublishSignalHistory(models.Model):
    _name = "mqtt.publish.signal.history"
    _description = "MQTT Message"
    _rec_name = "topic"
    _order = "id desc"

    broker_id = fields.Many2one("mqtt.broker", ondelete="set null", readonly=True)
    subscription_id = fields.Many2one("mqtt.subscription", ondelete="set null", readonly=True)
    company_id = fields.Many2one(
        "res.company",
        compute="_compute_company_id",
        store=True,
        readonly=False,
        precompute=True,
    )
    direction = fields.Selection(
        [("in", "Incoming"), ("out", "Outgoing")], required=True, readonly=True
    )
    state = fields.Selection(
        [
            ("received", "Received"),
            ("processed", "Processed"),
            ("failed", "Failed"),
            ("queued", "Queued"),
            ("sent", "Sent"),
        ],
        required=True,
        readonly=True,
    )
    topic = fields.Char(readonly=True)
    payload = fields.Binary(attachment=False, readonly=True, help="The exact bytes.")
    payload_preview = fields.Text(
        string="Preview",
        readonly=True,
        help="The payload as text: invalid UTF-8 replaced, control characters escaped, long "
        "payloads cut.",
    )
    payload_size = fields.Integer(string="Size (bytes)", readonly=True)
    payload_hash = fields.Char(string="SHA-256", readonly=True)
    qos = fields.Integer(string="QoS", readonly=True)
    retain = fields.Boolean(readonly=True)
    redelivered = fields.Boolean(
        readonly=True, help="The broker delivered this message again (DUP flag)."
    )
    dedup_key = fields.Char(
        string="Deduplication key",
        readonly=True,
        help="The publisher's message id: a message with the same key from the same broker is "
        "stored once.",
    )
    content_type = fields.Char(readonly=True)
    response_topic = fields.Char(readonly=True)
    correlation_data = fields.Binary(attachment=False, readonly=True)
    message_expiry = fields.Integer(string="Message expiry (s)", readonly=True)
    payload_format = fields.Integer(
        readonly=True, help="MQTT 5 payload format indicator: 1 means UTF-8 text."
    )
    error = fields.Text(readonly=True)
    attempts = fields.Integer(readonly=True)
    received_at = fields.Datetime(readonly=True, index=True)
    processed_at = fields.Datetime(readonly=True)
    sent_at = fields.Datetime(readonly=True)
    next_attempt_at = fields.Datetime(readonly=True)
    user_property_ids = fields.One2many(
        "mqtt.user.property", "message_id", string="User properties", readonly=True
    )

    payload_pretty = fields.Text(string="Payload (text)", compute="_compute_payload_pretty")
    payload_filename = fields.Char(compute="_compute_payload_filename")

    if hasattr(models, "Constraint"):  # Odoo 19
        _broker_id_dedup_key_uniq = models.Constraint(
            "UNIQUE (broker_id, dedup_key)",
            "This message (same broker and deduplication key) is already stored.",
        )
    else:
        _sql_constraints = [
            (
                "broker_id_dedup_key_uniq",
                "UNIQUE (broker_id, dedup_key)",
                "This message (same broker and deduplication key) is already stored.",
            ),
        ]

    def init(self):
        # the outbox's work queue, as the engine declares it (partial: received rows, nearly
        # all of them, cost no index entry); the earlier full (state, direction) index goes
        self.env.cr.execute(f"DROP INDEX IF EXISTS {self._table}_state_direction_idx")
        for statement in schema.partial_index_statements(schema.HISTORY):
            self.env.cr.execute(statement)

    @api.depends("broker_id")
    def _compute_company_id(self):
        for message in self:
            message.company_id = message.broker_id.company_id

    @api.depends("payload", "payload_preview", "payload_size")
    def _compute_payload_pretty(self):
        # the web client reads binary fields with bin_size (their size only): read the bytes
        for message, raw in zip(self, self.with_context(bin_size=False), strict=True):
            message.payload_pretty = message._pretty_payload(raw.payload)

    def _pretty_payload(self, column_value):
        """Indented JSON when the payload is JSON, else the safe text preview."""
        if not column_value:
            return self.payload_preview or False
        if self.payload_size > PRETTY_MAX_BYTES:
            return self.payload_preview
        try:
            data = engine_payload.from_column(column_value)
        except engine_payload.PayloadError as error:
            return f"({error})"
        return (
            engine_payload.pretty_json(data) or self.payload_preview or engine_payload.preview(data)
        )

    def _compute_payload_filename(self):
        for message in self:
            message.payload_filename = f"mqtt-message-{message.id or 'new'}.bin"

    @api.autovacuum
    def _gc_old_messages(self):
        """Delete the messages older than ``mqtt_listener.history_days`` days, but queued ones.

        SQL in batches of :data:`GC_BATCH` rows, oldest first: no batch holds more than that many
        rows in memory or in one statement, and user properties go with their message through
        the foreign key's ON DELETE CASCADE.
        """
        param = self.env["ir.config_parameter"].sudo().get_param(HISTORY_DAYS_PARAM)
        try:
            days = int(param) if param not in (None, False, "") else DEFAULT_HISTORY_DAYS
        except ValueError:
            _logger.warning(
                "System parameter %s=%r is not a number of days; keeping %d days",
                HISTORY_DAYS_PARAM,
                param,
                DEFAULT_HISTORY_DAYS,
            )
            days = DEFAULT_HISTORY_DAYS
        if days <= 0:
            return 0
        cutoff = fields.Datetime.now() - timedelta(days=days)
        deleted = 0
        while True:
            self.env.cr.execute(
                f"""
                DELETE FROM {self._table} WHERE id IN (
                    SELECT id FROM {self._table}
                     WHERE create_date < %s AND state IN %s
                     ORDER BY id
                     LIMIT %s
                )
                """,
                (cutoff, GC_STATES, GC_BATCH),
            )
            deleted += self.env.cr.rowcount
            if self.env.cr.rowcount < GC_BATCH:
                break
        if deleted:
            self.env.invalidate_all()
            _logger.info(
                "Deleted %d MQTT messages older than %d days from database %s",
                deleted,
                days,
                self.env.cr.dbname,
            )
        return deleted
