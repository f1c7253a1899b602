"""Topic filters the listener subscribes to, one broker each.

Creating, changing or archiving a subscription sends a ``config`` NOTIFY: the running listener
subscribes or unsubscribes within seconds, without a restart. The topic filter is checked with the
engine's own rules (:func:`mqtt_engine.topics.validate_filter`), so the form shows the very text
the engine would log.
"""

from mqtt_engine import topics

from odoo import _, api, fields, models
from odoo.exceptions import ValidationError


class MqttSubscription(models.Model):
    _name = "mqtt.subscription"
    _inherit = ["mqtt.config.mixin"]
    _description = "MQTT Subscription"
    _rec_name = "topic_filter"
    _order = "broker_id, sequence, topic_filter, id"

    broker_id = fields.Many2one("mqtt.broker", required=True, ondelete="cascade", index=True)
    broker_protocol = fields.Selection(related="broker_id.protocol")
    company_id = fields.Many2one(related="broker_id.company_id", store=True)
    sequence = fields.Integer(default=10)
    active = fields.Boolean(default=True)
    topic_filter = fields.Char(
        required=True,
        help="A topic or a filter with wildcards: + matches one level, # the rest "
        "(sensors/+/temperature, sensors/#). For a shared subscription, put the group in "
        "Shared group rather than writing $share/... here.",
    )
    qos = fields.Selection(
        [
            ("0", "0 (at most once)"),
            ("1", "1 (at least once)"),
            ("2", "2 (stored exactly once with a dedup key; received as QoS 1, see help)"),
        ],
        string="QoS",
        default="1",
        required=True,
        help="0: a message may be lost. 1: every message is stored at least once: it is "
        "acknowledged only after its row is committed. 2: subscribed as QoS 1 (the QoS 2 "
        "handshake lives in memory only and loses messages on a crash), and a deduplication "
        "key turns the broker's redeliveries into one row: exactly once in the database. "
        "Set a deduplication mode with QoS 2.",
    )
    no_local = fields.Boolean(
        help="MQTT 5: do not receive the messages this listener publishes itself.",
    )
    retain_as_published = fields.Boolean(
        help="MQTT 5: keep the retain flag as the publisher set it (otherwise the broker clears "
        "it on forwarded messages).",
    )
    retain_handling = fields.Selection(
        [
            ("0", "Send retained messages at every subscribe"),
            ("1", "Send retained messages only for a new subscription"),
            ("2", "Never send retained messages"),
        ],
        default="0",
        required=True,
        help="MQTT 5: what the broker does with the retained messages of matching topics when "
        "the listener subscribes.",
    )
    share_group = fields.Char(
        string="Shared group",
        help="MQTT 5 shared subscription: subscribe as $share/<group>/<filter>, so that the "
        "broker hands each message to one member of the group only. Several Odoo databases or "
        "deployments can then split one stream without duplicates.",
    )
    dedup_mode = fields.Selection(
        [
            ("none", "None"),
            ("property", "User property"),
            ("json", "JSON key"),
        ],
        string="Deduplication",
        default="none",
        required=True,
        help="How a message is recognised when the broker delivers it again. None: every "
        "delivery is a row (redeliveries are flagged). User property: the MQTT 5 user "
        "property named in Deduplication key holds the message id. JSON key: the payload is "
        "a JSON object and the key (a dotted path such as meta.id) holds the message id. "
        "A message seen before is not stored twice.",
    )
    dedup_key = fields.Char(
        string="Deduplication key",
        help="The user property name, or the JSON key (dotted path), that holds the publisher's "
        "message id.",
    )

    @api.depends("broker_id.name", "topic_filter", "share_group", "qos")
    def _compute_display_name(self):
        for subscription in self:
            topic = subscription.topic_filter
            if not topic:
                # a new subscription: the breadcrumb then says "New", not "(QoS 1)"
                subscription.display_name = False
                continue
            if subscription.share_group:
                topic = f"$share/{subscription.share_group}/{topic}"
            broker = subscription.broker_id.name
            qos = subscription.qos or "0"
            subscription.display_name = (
                f"{broker}: {topic} (QoS {qos})" if broker else f"{topic} (QoS {qos})"
            )

    @api.constrains("topic_filter")
    def _check_topic_filter(self):
        for subscription in self:
            topic_filter = subscription.topic_filter or ""
            if topic_filter.startswith("$share/"):
                raise ValidationError(
                    _(
                        "Write the shared group in the Shared group field and the plain filter "
                        "here, not %(filter)s.",
                        filter=topic_filter,
                    )
                )
            try:
                topics.validate_filter(topic_filter)
            except topics.TopicError as error:
                raise ValidationError(
                    _(
                        "Invalid topic filter %(filter)r: %(error)s",
                        filter=topic_filter,
                        error=error,
                    )
                ) from error

    @api.constrains("share_group", "no_local")
    def _check_share_group(self):
        for subscription in self:
            group = subscription.share_group
            if not group:
                continue
            try:
                topics.validate_share_group(group)
            except topics.TopicError as error:
                raise ValidationError(
                    _("Invalid shared group %(group)r: %(error)s", group=group, error=error)
                ) from error
            if subscription.no_local:
                raise ValidationError(
                    _("No local cannot be set on a shared subscription (MQTT 5 forbids it).")
                )

    @api.constrains("dedup_mode", "dedup_key")
    def _check_dedup_key(self):
        for subscription in self:
            if subscription.dedup_mode != "none" and not subscription.dedup_key:
                raise ValidationError(
                    _(
                        "Deduplication by user property or JSON key needs a deduplication key: "
                        "the name of the user property, or the JSON key, that holds the message "
                        "id (subscription %(filter)s).",
                        filter=subscription.topic_filter,
                    )
                )
