"""Broker connections: where to connect, how to authenticate, what the runner reports back.

The runner reads this table (:data:`mqtt_engine.schema.BROKER`) and turns each row into a
:class:`mqtt_engine.config.BrokerConfig` with :func:`mqtt_engine.config.broker_from_row`; this
model does the same for the Test connection button. Credentials and the TLS private key are
readable and writable by ``base.group_system`` only and never logged.
"""

import re

from mqtt_engine import check, schema, topics
from mqtt_engine import config as engine_config

from odoo import _, api, fields, models
from odoo.exceptions import ValidationError

from .mqtt_broker_state import BROKER_STATES
from .tools import check_operation

QOS = [("0", "0 (at most once)"), ("1", "1 (at least once)"), ("2", "2 (exactly once)")]


def _looks_like_pem(text, label):
    """Whether ``text`` holds a PEM block whose label ends with ``label`` (a header check)."""
    pattern = rf"-----BEGIN ((?:[A-Z0-9]+ )*{label})-----.+?-----END \1-----"
    return re.search(pattern, text, re.DOTALL) is not None


class MqttBroker(models.Model):
    _name = "mqtt.broker"
    _inherit = ["mqtt.config.mixin"]
    _description = "MQTT Broker"
    _order = "sequence, name, id"

    # -- connection ------------------------------------------------------------------------
    name = fields.Char(required=True)
    sequence = fields.Integer(default=10)
    active = fields.Boolean(default=True)
    enabled = fields.Boolean(
        default=True,
        help="Start / Stop of this broker alone: when off, the runner stays disconnected from it "
        "while the rest of the service keeps running.",
    )
    company_id = fields.Many2one(
        "res.company",
        default=lambda self: self.env.company,
        help="Messages received from this broker belong to this company. Leave empty to share "
        "the broker between companies.",
    )
    host = fields.Char(required=True, default="localhost")
    port = fields.Integer(default=1883, help="1883 for MQTT over TCP, 8883 with TLS, as a rule.")
    transport = fields.Selection(
        [("tcp", "TCP"), ("websockets", "WebSocket")], default="tcp", required=True
    )
    ws_path = fields.Char(string="WebSocket path", default="/mqtt")
    client_id = fields.Char(
        string="Client ID",
        copy=False,
        help="The MQTT client id the listener connects with. Generated from the database and the "
        "broker, and stable, so the broker keeps the listener's session (and the messages that "
        "arrive) while Odoo is down. Two connections with one client id kick each other off.",
    )
    protocol = fields.Selection(
        [("5", "MQTT 5"), ("311", "MQTT 3.1.1")], default="5", required=True
    )
    keepalive = fields.Integer(
        default=60, help="Seconds between keep-alive pings when nothing else is sent."
    )

    # -- security --------------------------------------------------------------------------
    tls = fields.Boolean(string="TLS")
    tls_insecure = fields.Boolean(
        string="Skip certificate verification",
        help="Accept any certificate and host name. For tests only: anybody on the path can "
        "then read and change the traffic.",
    )
    tls_ca_cert = fields.Text(
        string="CA certificate",
        help="PEM. Empty: the system's trusted authorities.",
    )
    tls_client_cert = fields.Text(string="Client certificate", help="PEM, for mutual TLS.")
    tls_client_key = fields.Text(
        string="Client private key",
        groups="base.group_system",
        copy=False,
        help="PEM, unencrypted, for mutual TLS.",
    )
    username = fields.Char(groups="base.group_system", copy=False)
    password = fields.Char(groups="base.group_system", copy=False)

    # -- session ---------------------------------------------------------------------------
    clean_start = fields.Boolean(
        default=False,
        help="Start with an empty session at every connection. Leave it off: the broker then "
        "keeps the subscriptions and the messages that arrive while the listener is away.",
    )
    session_expiry = fields.Integer(
        default=engine_config.DEFAULT_SESSION_EXPIRY,
        help="MQTT 5: seconds the broker keeps the session after a disconnection (default 7 "
        "days). MQTT 3.1.1 brokers keep it until the next clean start.",
    )
    receive_maximum = fields.Integer(
        default=engine_config.DEFAULT_RECEIVE_MAXIMUM,
        help="MQTT 5: how many QoS 1 and 2 messages the broker may send before the listener "
        "has acknowledged them.",
    )
    max_payload_size = fields.Integer(
        string="Maximum payload (bytes)",
        default=engine_config.DEFAULT_MAX_PAYLOAD,
        help="A larger message is recorded as failed with its size and hash; it is never "
        "silently truncated.",
    )
    will_topic = fields.Char(
        help="Last will: what the broker publishes when the listener disappears without saying "
        "goodbye. Empty: no will."
    )
    will_payload = fields.Text()
    will_qos = fields.Selection(QOS, string="Will QoS", default="0")
    will_retain = fields.Boolean()

    # -- what the runner reports (mqtt.broker.state), never stored here ---------------------
    state_ids = fields.One2many(
        "mqtt.broker.state", "broker_id", string="Runner reports", readonly=True
    )
    state = fields.Selection([*BROKER_STATES, ("unknown", "Unknown")], compute="_compute_runtime")
    state_since = fields.Datetime(string="Since", compute="_compute_runtime")
    last_error = fields.Text(compute="_compute_runtime")
    messages_in = fields.Integer(compute="_compute_runtime")
    messages_out = fields.Integer(compute="_compute_runtime")
    rate_in = fields.Float(string="Rate in (msg/s)", compute="_compute_runtime")
    last_message_at = fields.Datetime(compute="_compute_runtime")
    backlog = fields.Integer(compute="_compute_runtime")
    subscribed = fields.Text(compute="_compute_runtime")

    subscription_ids = fields.One2many("mqtt.subscription", "broker_id")
    subscription_count = fields.Integer(compute="_compute_subscription_count")
    message_count = fields.Integer(compute="_compute_message_count")

    @api.depends("state_ids")
    def _compute_runtime(self):
        for broker in self:
            row = broker.sudo().state_ids[:1]
            broker.state = row.state or "unknown"
            broker.state_since = row.state_since
            broker.last_error = row.last_error
            broker.messages_in = row.messages_in
            broker.messages_out = row.messages_out
            broker.rate_in = row.rate_in
            broker.last_message_at = row.last_message_at
            broker.backlog = row.backlog
            broker.subscribed = row.subscribed

    @api.depends("subscription_ids")
    def _compute_subscription_count(self):
        for broker in self:
            broker.subscription_count = len(broker.subscription_ids)

    def _compute_message_count(self):
        counts = dict(
            self.env["mqtt.publish.signal.history"]._read_group(
                [("broker_id", "in", self.ids)], ["broker_id"], ["__count"]
            )
        )
        for broker in self:
            broker.message_count = counts.get(broker, 0)

    # -- constraints -----------------------------------------------------------------------

    @api.constrains("port")
    def _check_port(self):
        for broker in self:
            if not 1 <= broker.port <= 65535:
                raise ValidationError(
                    _(
                        "The port of broker %(name)s must be between 1 and 65535, not %(port)s.",
                        name=broker.name,
                        port=broker.port,
                    )
                )

    @api.constrains("keepalive", "session_expiry", "receive_maximum", "max_payload_size")
    def _check_session_numbers(self):
        for broker in self:
            if not 0 <= broker.keepalive <= 65535:
                raise ValidationError(_("The keepalive must be between 0 and 65535 seconds."))
            if broker.session_expiry < 0:
                raise ValidationError(
                    _("The session expiry is a number of seconds: it cannot be negative.")
                )
            if not 1 <= broker.receive_maximum <= 65535:
                raise ValidationError(_("The receive maximum must be between 1 and 65535."))
            if broker.max_payload_size < 1:
                raise ValidationError(_("The maximum payload size must be at least 1 byte."))

    @api.constrains("transport", "ws_path")
    def _check_ws_path(self):
        for broker in self:
            if broker.transport == "websockets" and not (broker.ws_path or "").startswith("/"):
                raise ValidationError(_("The WebSocket path must start with '/', as in /mqtt."))

    @api.constrains("tls_ca_cert", "tls_client_cert", "tls_client_key")
    def _check_pem(self):
        for broker in self.sudo():
            if broker.tls_ca_cert and not _looks_like_pem(broker.tls_ca_cert, "CERTIFICATE"):
                raise ValidationError(
                    _(
                        "The CA certificate must be PEM text: one or more blocks from "
                        "-----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----."
                    )
                )
            if broker.tls_client_cert and not _looks_like_pem(
                broker.tls_client_cert, "CERTIFICATE"
            ):
                raise ValidationError(
                    _(
                        "The client certificate must be PEM text, from "
                        "-----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----."
                    )
                )
            key = broker.tls_client_key
            if key and (not _looks_like_pem(key, "PRIVATE KEY") or "ENCRYPTED" in key):
                raise ValidationError(
                    _(
                        "The client private key must be unencrypted PEM text, from "
                        "-----BEGIN PRIVATE KEY----- (or RSA/EC PRIVATE KEY) to its END line."
                    )
                )
            if bool(broker.tls_client_cert) != bool(broker.tls_client_key):
                raise ValidationError(
                    _("A client certificate and its private key go together: set both or neither.")
                )

    @api.constrains("will_topic")
    def _check_will_topic(self):
        for broker in self:
            if not broker.will_topic:
                continue
            try:
                topics.validate_topic(broker.will_topic)
            except topics.TopicError as error:
                raise ValidationError(
                    _(
                        "Invalid will topic %(topic)r: %(error)s",
                        topic=broker.will_topic,
                        error=error,
                    )
                ) from error

    @api.onchange("tls")
    def _onchange_tls(self):
        if self.tls and self.port == 1883:
            self.port = 8883
        elif not self.tls and self.port == 8883:
            self.port = 1883

    # -- CRUD (every change wakes the runner: see mqtt.config.mixin) ---------------------

    @api.model_create_multi
    def create(self, vals_list):
        brokers = super().create(vals_list)
        for broker in brokers.filtered(lambda b: not b.client_id):
            broker.client_id = broker._default_client_id()
        return brokers

    def write(self, vals):
        result = super().write(vals)
        if "client_id" in vals and not vals["client_id"]:
            # never empty: the session the broker keeps for us is keyed by this id
            for broker in self:
                broker.client_id = broker._default_client_id()
        return result

    def _default_client_id(self):
        """``mqtt-listener-<12 hex>``, derived from the database uuid and the broker id.

        The rule of :meth:`mqtt_engine.config.BrokerConfig.effective_client_id`, scoped by the
        database uuid (unique per database, unlike its name). The addon stores it at create and
        never leaves the column empty, so the engine never has to derive one.
        """
        self.ensure_one()
        scope = self.env["ir.config_parameter"].sudo().get_param("database.uuid")
        return engine_config.BrokerConfig(id=self.id).effective_client_id(scope)

    # -- engine values -----------------------------------------------------------------------

    def _engine_row(self):
        """This broker as an ``mqtt_broker`` row (column -> value), credentials included."""
        self.ensure_one()
        broker = self.sudo()
        row = {}
        for column in schema.BROKER.columns:
            value = broker[column]
            if isinstance(value, models.BaseModel):
                value = value.id or None
            row[column] = value
        return row

    def _engine_config(self):
        """This broker as the engine's :class:`~mqtt_engine.config.BrokerConfig`."""
        return engine_config.broker_from_row(self._engine_row())

    # -- buttons -----------------------------------------------------------------------------

    def action_test_connection(self):
        """Connect once with a client id of its own and report each step in plain words."""
        self.ensure_one()
        check_operation(self, "write")
        config = self._engine_config()
        client_id = (self.client_id or self._default_client_id()) + "-check"
        # subscribe to a plain filter of the broker (never a shared one: the check client would
        # take its share of the group's messages)
        topic = self.subscription_ids[:1].topic_filter or None
        result = check.check_broker(config, client_id=client_id, topic=topic, timeout=10)
        if result.ok:
            title = _("Connection to %s works", self.name)
        else:
            failed = next((step for step in result.steps if not step.ok), None)
            title = (
                _("Connection to %(name)s failed at %(step)s", name=self.name, step=failed.name)
                if failed
                else _("Connection to %s failed", self.name)
            )
        return {
            "type": "ir.actions.client",
            "tag": "display_notification",
            "params": {
                "title": title,
                "message": result.summary(),
                "type": "success" if result.ok else "danger",
                "sticky": True,
                # one line per step: the web client would run the summary's lines together
                "className": "text-prewrap",
            },
        }

    def action_start(self):
        """Connect this broker (the service itself must be running)."""
        self.write({"enabled": True})
        return True

    def action_stop(self):
        """Disconnect this broker and leave it disconnected until Start."""
        self.write({"enabled": False})
        return True

    def action_restart(self):
        """Drop and reopen the connection of these brokers."""
        check_operation(self, "write")
        service = self.env["mqtt.service"]
        for broker in self:
            service._notify_runner(f"restart:{broker.id}")
        return True

    def action_view_subscriptions(self):
        self.ensure_one()
        action = self.env["ir.actions.act_window"]._for_xml_id(
            "mqtt_listener.action_mqtt_subscription"
        )
        action["domain"] = [("broker_id", "=", self.id)]
        action["context"] = {"default_broker_id": self.id, "active_test": False}
        return action

    def action_view_messages(self):
        self.ensure_one()
        action = self.env["ir.actions.act_window"]._for_xml_id(
            "mqtt_listener.action_mqtt_publish_signal_history"
        )
        action["domain"] = [("broker_id", "=", self.id)]
        action["context"] = {"default_broker_id": self.id}
        return action
