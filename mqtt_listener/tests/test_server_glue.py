"""Where the runner may start: never during tests, --stop-after-init or in the gevent process."""

from unittest.mock import patch

import odoo
from odoo.tests import TransactionCase, tagged
from odoo.tools import config

from odoo.addons.mqtt_listener import server
from odoo.addons.mqtt_listener.server import supervisor


@tagged("post_install", "-at_install")
class TestServerGlue(TransactionCase):
    def test_no_runner_during_tests(self):
        # The addon was loaded (post_load ran) in this test server: no supervisor started.
        self.assertTrue(config["test_enable"] or config["test_file"])
        self.assertFalse(server.runner_enabled())
        self.assertIsNone(server.current_supervisor())

    def test_runner_enabled_rules(self):
        settings = {"test_enable": False, "test_file": False, "stop_after_init": False}
        with patch.dict(config.options, settings):
            self.assertTrue(server.runner_enabled())
            with patch.dict(config.options, {"stop_after_init": True}):
                self.assertFalse(server.runner_enabled())
            with patch.dict(config.options, {"mqtt_listener_runner": "False"}):
                self.assertFalse(server.runner_enabled())
            with patch.dict("os.environ", {"MQTT_LISTENER_RUNNER": "0"}):
                self.assertFalse(server.runner_enabled())
            with patch.object(odoo, "evented", True, create=True):
                self.assertFalse(server.runner_enabled())

    def test_integration_is_installed_once(self):
        spawn = odoo.service.server.PreforkServer.process_spawn
        server.install_server_integration()
        server.install_server_integration()
        self.assertIs(odoo.service.server.PreforkServer.process_spawn, spawn)
        self.assertIsNone(server.current_supervisor())

    def test_supervisor_sees_this_database(self):
        dbname = self.env.cr.dbname
        self.assertIn(f"dbname={dbname}", supervisor.database_dsn(dbname).replace("'", ""))
        self.assertTrue(supervisor.addon_installed(dbname))
        self.assertFalse(supervisor.addon_installed("no_such_database_for_mqtt"))
        with patch.dict(config.options, {"db_name": f"{dbname}, other"}):
            self.assertEqual(supervisor.configured_databases(), [dbname, "other"])
