"""Lifecycle hooks of the addon: install, uninstall and server start.

- ``_auto_start_mqtt()`` is the manifest's ``post_load``: Odoo calls it once per process when it
  imports the addon (at server start for a server-wide module, else when a registry loads it). It
  only hands over to the server glue (:mod:`.server`), which decides where the runner lives.
- ``_post_init_hook(env)`` runs inside the install transaction: it makes sure the ``mqtt.service``
  record exists and sends a ``service`` NOTIFY, which PostgreSQL delivers only when the install is
  committed, so a runner never looks at a half-installed database.
- ``_uninstall_hook(env)`` marks this database's service stopped and notifies its runner: the
  listener stops for this database only, every other database on the server keeps listening.

Every line is logged under ``odoo.addons.mqtt_listener``.
"""

import logging

_logger = logging.getLogger(__name__)


def service_model_or_warn(env):
    """The ``mqtt.service`` model of ``env``, or None after logging why it is missing."""
    if "mqtt.service" not in env.registry:
        _logger.warning("'mqtt.service' not present in environment for database %s", env.cr.dbname)
        return None
    return env["mqtt.service"]


def _auto_start_mqtt():
    """post_load hook: hook the runner into the Odoo server (once per process)."""
    from .server import install_server_integration

    install_server_integration()


def _wake_supervisor():
    """After the commit: a listener running in this process rescans its databases now."""
    from .server import wake_supervisor

    wake_supervisor()


def _post_init_hook(env):
    """Enable the service of the database the addon was just installed on."""
    service_model = service_model_or_warn(env)
    if service_model is None:
        return
    service_model.sudo()._get_service()
    service_model._notify_runner("service")
    env.cr.postcommit.add(_wake_supervisor)
    _logger.info(
        "MQTT service enabled for database %s; "
        "the runner starts listening once the install is committed",
        env.cr.dbname,
    )


def _uninstall_hook(env):
    """Stop the service of this database only, before its tables are dropped."""
    service_model = service_model_or_warn(env)
    if service_model is None:
        return
    service_model.sudo()._get_service().desired_state = "stopped"
    service_model._notify_runner("service")
    env.cr.postcommit.add(_wake_supervisor)
    _logger.info(
        "MQTT service stopped for database %s; its runner disconnects once the uninstall is "
        "committed",
        env.cr.dbname,
    )
