"""MQTT 5 user properties of a message: ordered key/value pairs, keys may repeat."""

from odoo import fields, models


class MqttUserProperty(models.Model):
    _name = "mqtt.user.property"
    _description = "MQTT User Property"
    _rec_name = "key"
    _order = "message_id, sequence, id"

    message_id = fields.Many2one(
        "mqtt.publish.signal.history",
        required=True,
        ondelete="cascade",
        index=True,
        readonly=True,
    )
    sequence = fields.Integer(readonly=True, help="Position in the message: keys may repeat.")
    key = fields.Char(required=True, readonly=True)
    value = fields.Text(readonly=True)
    company_id = fields.Many2one(related="message_id.company_id")
