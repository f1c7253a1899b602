"""The service switch of one database, and the operator's view of its runner.

The runner (in the engine) reads ``desired_state`` and the broker and subscription tables, and
writes back what it actually does: its heartbeat in ``mqtt_runner`` and each broker's connection in
``mqtt_broker_state``. Nothing here talks to a broker: every change is a row plus a NOTIFY on
:data:`mqtt_engine.schema.NOTIFY_CHANNEL`, which PostgreSQL delivers when the transaction commits,
so a runner never acts on a change that is rolled back.
"""

from mqtt_engine import schema

from odoo import _, api, fields, models
from odoo.exceptions import UserError

from .mqtt_runner import HEARTBEAT_TIMEOUT, RUNNER_MODES
from .tools import check_operation


class MqttService(models.Model):
    _name = "mqtt.service"
    _description = "MQTT Service"

    name = fields.Char(default="MQTT service")
    desired_state = fields.Selection(
        [("running", "Running"), ("stopped", "Stopped")],
        default="running",
        help="What the runner of this database is asked to do. Running: connect every enabled "
        "broker and keep the subscriptions; Stopped: disconnect every broker.",
    )
    runner_attached = fields.Boolean(
        compute="_compute_status",
        help=f"An active runner has sent a heartbeat within the last {HEARTBEAT_TIMEOUT} seconds.",
    )
    runner_id = fields.Many2one("mqtt.runner", string="Active runner", compute="_compute_status")
    runner_host = fields.Char(string="Runner host", compute="_compute_status")
    runner_pid = fields.Integer(string="Runner PID", compute="_compute_status")
    runner_mode = fields.Selection(RUNNER_MODES, string="Runner mode", compute="_compute_status")
    runner_started_at = fields.Datetime(string="Runner started", compute="_compute_status")
    runner_heartbeat_at = fields.Datetime(string="Last heartbeat", compute="_compute_status")
    standby_runner_ids = fields.Many2many(
        "mqtt.runner", string="Standby runners", compute="_compute_status"
    )
    broker_ids = fields.Many2many("mqtt.broker", string="Brokers", compute="_compute_status")
    backlog = fields.Integer(
        compute="_compute_status",
        help="Messages waiting for their commit plus outgoing messages waiting for the broker.",
    )
    last_error = fields.Text(compute="_compute_status")
    status_hint = fields.Text(string="Hint", compute="_compute_status")

    @api.depends_context("uid", "allowed_company_ids")
    def _compute_status(self):
        runners = self.env["mqtt.runner"]
        fresh = runners.search(runners._fresh_domain(), order="heartbeat_at desc")
        active = fresh.filtered(lambda r: r.role == "active")[:1]
        standby = fresh - active
        # a database has a handful of brokers: all of them are shown
        brokers = self.env["mqtt.broker"].search([])  # pylint: disable=no-search-all
        backlog = sum(brokers.mapped("backlog"))
        last_error = active.last_error or next(
            (b.last_error for b in brokers if b.state in ("error", "auth_failed") and b.last_error),
            False,
        )
        for service in self:
            service.runner_attached = bool(active)
            service.runner_id = active
            service.runner_host = active.host
            service.runner_pid = active.pid
            service.runner_mode = active.mode
            service.runner_started_at = active.started_at
            service.runner_heartbeat_at = active.heartbeat_at
            service.standby_runner_ids = standby
            service.broker_ids = brokers
            service.backlog = backlog
            service.last_error = last_error
            service.status_hint = service._status_hint(active, standby)

    def _status_hint(self, active, standby):
        hints = []
        if self.desired_state == "stopped":
            hints.append(
                _("The service is stopped: press Start, or call start_mqtt_service() on the model.")
            )
        if not active and standby:
            hints.append(
                _(
                    "Runners are standing by but none holds this database's lock yet: one takes "
                    "over within seconds of the previous active runner's end."
                )
            )
        elif not active:
            hints.append(
                _(
                    "No runner is attached to this database. A threaded Odoo server (started "
                    "without --workers) starts one by itself for every database where "
                    "mqtt_listener is installed. A prefork server (--workers N) needs either "
                    "'server_wide_modules = base,web,mqtt_listener' in odoo.conf, so that its "
                    "master spawns a dedicated runner worker, or the standalone command "
                    "'odoo-bin mqtt -c odoo.conf' running as its own service. No runner starts "
                    "under --stop-after-init or during tests."
                )
            )
        return "\n".join(hints) or False

    @api.model_create_multi
    def create(self, vals_list):
        if len(vals_list) > 1 or self.sudo().search_count([], limit=1):
            raise UserError(_("There is one MQTT service per database; it already exists."))
        return super().create(vals_list)

    # -- the single record ------------------------------------------------------------------

    @api.model
    def _get_service(self):
        """The service record of this database, created if it is missing, in ``self.env``."""
        service = self.env.ref("mqtt_listener.mqtt_service_main", raise_if_not_found=False)
        if not service:
            service = self.sudo().search([], order="id", limit=1)
        if not service:
            service = self.sudo().create({})
        return service.with_env(self.env)

    @api.model
    def _notify_runner(self, what):
        """Wake this database's runner when the transaction commits.

        ``what`` is ``config``, ``service``, ``outbox`` or ``restart:<broker id>``.
        NOTIFY is transactional: a rolled-back change wakes nobody, and identical payloads of one
        transaction are delivered once.
        """
        self.env.cr.execute("SELECT pg_notify(%s, %s)", (schema.NOTIFY_CHANNEL, what))

    # -- the specification's API ------------------------------------------------------------

    @api.model
    def start_mqtt_service(self):
        """Ask this database's runner to listen (connect every enabled broker)."""
        return self._get_service()._set_desired_state("running")

    @api.model
    def stop_mqtt_service(self):
        """Ask this database's runner to disconnect every broker and stay idle."""
        return self._get_service()._set_desired_state("stopped")

    @api.model
    def restart_mqtt_service(self):
        """Reconnect every broker of this database (and make sure the service runs)."""
        self._get_service()._set_desired_state("running")
        # the whole service restarts: every broker of the database, whatever the user's company
        self._notify_runner("restart")
        return True

    def _set_desired_state(self, state):
        self.ensure_one()
        self.write({"desired_state": state})
        self._notify_runner("service")
        return True

    @api.model
    def check_mqtt_status(self):
        """What the runner of this database does, as a dict an operator can read."""
        service = self._get_service()
        check_operation(service, "read")
        to_string = fields.Datetime.to_string
        active = service.runner_id

        def runner_dict(runner):
            return {
                "host": runner.host,
                "pid": runner.pid,
                "mode": runner.mode,
                "role": runner.role,
                "heartbeat_at": to_string(runner.heartbeat_at) or None,
                "started_at": to_string(runner.started_at) or None,
            }

        brokers = [
            {
                "id": broker.id,
                "name": broker.name,
                "enabled": broker.enabled,
                "state": broker.state,
                "since": to_string(broker.state_since) or None,
                "last_error": broker.last_error or None,
                "messages_in": broker.messages_in,
                "messages_out": broker.messages_out,
                "rate_in": broker.rate_in,
                "backlog": broker.backlog,
                "subscribed": (broker.subscribed or "").splitlines(),
            }
            for broker in service.broker_ids
        ]
        return {
            "database": self.env.cr.dbname,
            "desired_state": service.desired_state,
            "runner_attached": service.runner_attached,
            "runner": runner_dict(active) if active else None,
            "standby_runners": [runner_dict(r) for r in service.standby_runner_ids],
            "hint": service.status_hint or None,
            "brokers": brokers,
            "backlog": service.backlog,
            "last_error": service.last_error or None,
        }

    # -- buttons ----------------------------------------------------------------------------

    def action_start(self):
        return self.start_mqtt_service()

    def action_stop(self):
        return self.stop_mqtt_service()

    def action_restart(self):
        return self.restart_mqtt_service()

    def action_refresh(self):
        """Reload the status form (the values are computed on read)."""
        return True

    @api.model
    def action_open_service(self):
        """The window action of the Service menu: the form of this database's single record."""
        action = self.env["ir.actions.act_window"]._for_xml_id("mqtt_listener.action_mqtt_service")
        action["res_id"] = self._get_service().id
        return action
