"""Who may do what: the access matrix over every model, credentials, and multi-company rules."""

from odoo.exceptions import AccessError
from odoo.tests import Form, tagged

from .common import MqttCase, has_model_access

OPERATIONS = ("read", "write", "create", "unlink")
ROLES = ("public", "portal", "internal", "mqtt_user", "mqtt_manager", "system")
ALL, READ, NONE = "rwcu", "r", ""

# model: access per role, in ROLES order; letters are the OPERATIONS' initials
MATRIX = {
    "mqtt.broker": (NONE, NONE, NONE, READ, ALL, ALL),
    "mqtt.subscription": (NONE, NONE, NONE, READ, ALL, ALL),
    "mqtt.service": (NONE, NONE, NONE, READ, "rw", ALL),
    "mqtt.runner": (NONE, NONE, NONE, READ, READ, ALL),
    "mqtt.broker.state": (NONE, NONE, NONE, READ, READ, ALL),
    "mqtt.publish.signal.history": (NONE, NONE, NONE, READ, ALL, ALL),
    "mqtt.user.property": (NONE, NONE, NONE, READ, ALL, ALL),
}
SECRETS = ("username", "password", "tls_client_key")


@tagged("post_install", "-at_install")
class TestAccess(MqttCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.users = {
            "public": cls.create_user("mqtt_public", ["base.group_public"]),
            "portal": cls.create_user("mqtt_portal", ["base.group_portal"]),
            "internal": cls.create_user("mqtt_internal", ["base.group_user"]),
            "mqtt_user": cls.create_user("mqtt_reader", ["mqtt_listener.group_mqtt_user"]),
            "mqtt_manager": cls.create_user(
                "mqtt_manager",
                ["mqtt_listener.group_mqtt_manager", "base.group_allow_export"],
            ),
            "system": cls.create_user("mqtt_system", ["base.group_system"]),
        }
        cls.broker.sudo().write(
            {"username": "odoo", "password": "s3cret", "tls": True, "tls_client_key": False}
        )
        cls.message = cls.create_message(payload=b"{}", user_properties=[("k", "v")])
        cls.runner = cls.env["mqtt.runner"].create({"name": "test-host:1"})
        cls.state = cls.env["mqtt.broker.state"].create({"broker_id": cls.broker.id})

    def test_matrix(self):
        """ACLs of every model for every role, as the table above says."""
        stored = {
            name
            for name, model in self.env.registry.items()
            if name.startswith("mqtt.") and not model._abstract
        }
        self.assertEqual(set(MATRIX), stored)
        for model_name, row in MATRIX.items():
            for role, allowed in zip(ROLES, row, strict=True):
                model = self.env[model_name].with_user(self.users[role])
                for operation in OPERATIONS:
                    with self.subTest(model=model_name, role=role, operation=operation):
                        self.assertEqual(
                            has_model_access(model, operation), operation[0] in allowed
                        )

    def test_records_by_role(self):
        """The matrix holds on real records, through the ORM calls a client makes."""
        records = {
            "mqtt.broker": self.broker,
            "mqtt.subscription": self.subscription,
            "mqtt.service": self.env["mqtt.service"]._get_service(),
            "mqtt.runner": self.runner,
            "mqtt.broker.state": self.state,
            "mqtt.publish.signal.history": self.message,
            "mqtt.user.property": self.message.user_property_ids,
        }
        for model_name, record in records.items():
            for role, allowed in zip(ROLES, MATRIX[model_name], strict=True):
                mine = record.with_user(self.users[role])
                with self.subTest(model=model_name, role=role, operation="read"):
                    if "r" in allowed:
                        self.assertTrue(mine.read(["display_name"]))
                        self.assertIn(record, mine.search([("id", "=", record.id)]))
                    else:
                        with self.assertRaises(AccessError):
                            mine.read(["display_name"])
                        with self.assertRaises(AccessError):
                            mine.search([])
                with self.subTest(model=model_name, role=role, operation="write"):
                    if "w" in allowed:
                        mine.write({})
                    else:
                        with self.assertRaises(AccessError):
                            mine.write({"create_uid": self.env.uid})

    def test_configuration_by_role(self):
        manager = self.users["mqtt_manager"]
        broker = (
            self.env["mqtt.broker"]
            .with_user(manager)
            .create({"name": "By manager", "host": "127.0.0.1"})
        )
        self.env["mqtt.subscription"].with_user(manager).create(
            {"broker_id": broker.id, "topic_filter": "manager/#"}
        )
        for role in ("internal", "mqtt_user"):
            with self.subTest(role=role), self.assertRaises(AccessError):
                self.env["mqtt.broker"].with_user(self.users[role]).create(
                    {"name": "Not allowed", "host": "127.0.0.1"}
                )

    def test_service_api_by_role(self):
        service = self.env["mqtt.service"]
        reader = service.with_user(self.users["mqtt_user"])
        self.assertIn("desired_state", reader.check_mqtt_status())
        for method in ("start_mqtt_service", "stop_mqtt_service", "restart_mqtt_service"):
            with self.subTest(method=method), self.assertRaises(AccessError):
                getattr(reader, method)()
        for role in ("internal", "portal"):
            with self.subTest(role=role), self.assertRaises(AccessError):
                service.with_user(self.users[role]).check_mqtt_status()
        manager = service.with_user(self.users["mqtt_manager"])
        manager.stop_mqtt_service()
        self.assertEqual(service._get_service().desired_state, "stopped")
        manager.start_mqtt_service()
        self.assertEqual(service._get_service().desired_state, "running")

    def test_broker_buttons_by_role(self):
        reader = self.broker.with_user(self.users["mqtt_user"])
        for method in ("action_test_connection", "action_start", "action_stop", "action_restart"):
            with self.subTest(method=method), self.assertRaises(AccessError):
                getattr(reader, method)()

    def test_secrets_hidden_from_non_system(self):
        for role in ("mqtt_user", "mqtt_manager"):
            broker = self.broker.with_user(self.users[role])
            for secret in SECRETS:
                with self.subTest(role=role, field=secret):
                    with self.assertRaises(AccessError):
                        broker.read([secret])
                    with self.assertRaises(AccessError):
                        broker.search_read([("id", "=", broker.id)], [secret])
                    with self.assertRaises(AccessError):
                        broker.web_search_read([("id", "=", broker.id)], {secret: {}})
                    with self.assertRaises(AccessError):
                        broker.web_read({secret: {}})
                    with self.assertRaises(AccessError):
                        broker[secret]
                    self.assertNotIn(secret, broker.fields_get())
                    self.assertNotIn(secret, broker.read()[0])
                    self.assertNotIn(secret, broker.search_read([("id", "=", broker.id)])[0])
        manager = self.broker.with_user(self.users["mqtt_manager"])
        self.assertEqual(manager.export_data(["name"])["datas"], [["Test broker"]])
        with self.assertRaises(AccessError):
            manager.export_data(["password"])
        with self.assertRaises(AccessError):
            manager.write({"password": "changed"})
        copy = manager.copy()
        self.assertFalse(copy.sudo().password, "credentials are never copied")
        self.assertEqual(self.broker.sudo().password, "s3cret")

    def test_secrets_for_system(self):
        broker = self.broker.with_user(self.users["system"])
        self.assertEqual(broker.read(["password"])[0]["password"], "s3cret")
        self.assertIn("password", broker.fields_get())
        self.assertEqual(broker.export_data(["password"])["datas"], [["s3cret"]])
        broker.write({"password": "changed"})
        self.assertEqual(self.broker.sudo().password, "changed")

    def test_password_field_definition(self):
        field = self.env["mqtt.broker"]._fields["password"]
        self.assertEqual(field.groups, "base.group_system")
        self.assertFalse(field.copy)
        arch = self.env["mqtt.broker"].sudo().get_view(view_type="form")["arch"]
        self.assertRegex(arch, r'<field name="password"[^>]*password="True"')

    def test_menus(self):
        root = self.env.ref("mqtt_listener.menu_mqtt_root")
        menus = self.env["ir.ui.menu"]
        for role, visible in [("internal", False), ("mqtt_user", True), ("mqtt_manager", True)]:
            with self.subTest(role=role):
                ids = menus.with_user(self.users[role])._visible_menu_ids()
                self.assertEqual(root.id in ids, visible)

    def test_views_for_each_role(self):
        """Every view of the app opens for its readers, with the secrets left out."""
        view_types = {
            "mqtt.broker": ("list", "form", "search"),
            "mqtt.subscription": ("list", "form", "search"),
            "mqtt.service": ("form",),
            "mqtt.runner": ("list", "form", "search"),
            "mqtt.broker.state": ("list", "form"),
            "mqtt.publish.signal.history": ("list", "form", "search", "pivot", "graph"),
            "mqtt.user.property": ("list", "search"),
        }
        for role in ("mqtt_user", "mqtt_manager", "system"):
            for model_name, types in view_types.items():
                with self.subTest(role=role, model=model_name):
                    model = self.env[model_name].with_user(self.users[role])
                    views = model.get_views([(False, view_type) for view_type in types])
                    self.assertEqual(set(views["views"]), set(types))
                    if model_name == "mqtt.broker":
                        arch = views["views"]["form"]["arch"]
                        shown = 'name="password"' in arch
                        self.assertEqual(shown, role == "system", f"password in {role}'s form")

    def test_service_menu_opens_the_single_record(self):
        action = self.env.ref("mqtt_listener.action_server_mqtt_service")
        service = self.env.ref("mqtt_listener.mqtt_service_main")
        result = action.with_user(self.users["mqtt_user"]).run()
        self.assertEqual((result["res_model"], result["res_id"]), ("mqtt.service", service.id))

    def test_manager_form_without_secrets(self):
        """A manager fills the broker form (no credentials in it) and saves."""
        with Form(self.env["mqtt.broker"].with_user(self.users["mqtt_manager"])) as form:
            form.name = "From the form"
            form.host = "broker.example.com"
            form.tls = True
            self.assertEqual(form.port, 8883, "TLS suggests the TLS port")
        broker = form.save()
        self.assertEqual(broker.sudo().port, 8883)
        self.assertFalse(broker.sudo().password)


@tagged("post_install", "-at_install")
class TestMultiCompany(MqttCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.company_a = cls.env.company
        cls.company_b = cls.env["res.company"].create({"name": "MQTT Company B"})
        cls.broker_b = cls.create_broker(name="Broker B", company_id=cls.company_b.id)
        cls.subscription_b = cls.create_subscription(cls.broker_b)
        cls.message_b = cls.create_message(broker=cls.broker_b, user_properties=[("k", "v")])
        cls.state_b = cls.env["mqtt.broker.state"].create({"broker_id": cls.broker_b.id})
        cls.shared = cls.create_broker(name="Shared", company_id=False)
        cls.user_a = cls.create_user(
            "mqtt_company_a",
            ["mqtt_listener.group_mqtt_manager"],
            company_id=cls.company_a.id,
            company_ids=[(6, 0, cls.company_a.ids)],
        )

    def test_other_company_is_invisible(self):
        env = self.env(user=self.user_a)
        self.assertEqual(
            env["mqtt.broker"].search(
                [("id", "in", (self.broker | self.broker_b | self.shared).ids)]
            ),
            self.broker | self.shared,
        )
        self.assertNotIn(self.subscription_b, env["mqtt.subscription"].search([]))
        self.assertNotIn(self.message_b, env["mqtt.publish.signal.history"].search([]))
        self.assertNotIn(self.state_b, env["mqtt.broker.state"].search([]))
        self.assertFalse(
            env["mqtt.user.property"].search([("id", "in", self.message_b.user_property_ids.ids)])
        )
        with self.assertRaises(AccessError):
            self.broker_b.with_user(self.user_a).read(["name"])
        status = env["mqtt.service"].check_mqtt_status()
        self.assertNotIn(self.broker_b.id, [b["id"] for b in status["brokers"]])

    def test_visible_when_allowed(self):
        self.user_a.company_ids = [(4, self.company_b.id)]
        env = self.env(
            user=self.user_a,
            context={"allowed_company_ids": [self.company_a.id, self.company_b.id]},
        )
        self.assertIn(self.broker_b, env["mqtt.broker"].search([]))
        self.assertIn(self.message_b, env["mqtt.publish.signal.history"].search([]))
        self.assertIn(self.subscription_b, env["mqtt.subscription"].search([]))
