"""What the runner reports about each broker connection: state, counters, rates, last error.

One row per broker, written by the engine's runner with SQL (never through the ORM, and never
from a form): the broker form and the service status read it.
"""

from odoo import fields, models

BROKER_STATES = [
    ("connected", "Connected"),
    ("connecting", "Connecting"),
    ("disconnected", "Disconnected"),
    ("auth_failed", "Authentication failed"),
    ("error", "Error"),
    ("stopped", "Stopped"),
]


class MqttBrokerState(models.Model):
    _name = "mqtt.broker.state"
    _description = "MQTT Broker State"
    _rec_name = "broker_id"
    _order = "broker_id"

    broker_id = fields.Many2one("mqtt.broker", required=True, readonly=True, ondelete="cascade")
    state = fields.Selection(BROKER_STATES, readonly=True)
    state_since = fields.Datetime(string="Since", readonly=True)
    last_error = fields.Text(readonly=True)
    last_connected_at = fields.Datetime(readonly=True)
    last_message_at = fields.Datetime(readonly=True)
    messages_in = fields.Integer(readonly=True)
    messages_out = fields.Integer(readonly=True)
    rate_in = fields.Float(string="Rate in (msg/s)", readonly=True)
    rate_out = fields.Float(string="Rate out (msg/s)", readonly=True)
    backlog = fields.Integer(
        readonly=True,
        help="Messages received and waiting for their commit, plus outgoing messages queued.",
    )
    subscribed = fields.Text(
        readonly=True, help="One 'filter qos' per line, as granted by the broker."
    )
    updated_at = fields.Datetime(readonly=True)
    company_id = fields.Many2one(related="broker_id.company_id")

    if hasattr(models, "Constraint"):  # Odoo 19
        _broker_id_uniq = models.Constraint("UNIQUE (broker_id)", "A broker has one state row.")
    else:
        _sql_constraints = [
            ("broker_id_uniq", "UNIQUE (broker_id)", "A broker has one state row."),
        ]
