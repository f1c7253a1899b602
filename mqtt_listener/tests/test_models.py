"""Models: defaults, generated ids, constraints with their messages, service API and hooks."""

import base64
import contextlib
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import time
import types
from datetime import timedelta

import psycopg2
from psycopg2.extensions import ISOLATION_LEVEL_AUTOCOMMIT

from mqtt_engine import config as engine_config
from mqtt_engine import schema, topics

from odoo import SUPERUSER_ID, api, fields, sql_db, tools
from odoo.exceptions import UserError, ValidationError
from odoo.tests import tagged
from odoo.tools import mute_logger

from .. import hooks
from .common import CLOSED_PORT, MqttCase

CERT = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----\n"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@contextlib.contextmanager
def mosquitto():
    """A throwaway mosquitto on a free 127.0.0.1 port: yields ``(port, log_path)``."""
    with tempfile.TemporaryDirectory() as directory:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log_path = os.path.join(directory, "mosquitto.log")
        conf_path = os.path.join(directory, "mosquitto.conf")
        with open(conf_path, "w") as conf:
            conf.write(
                f"{'user root' if os.geteuid() == 0 else ''}\n"
                f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                f"log_dest file {log_path}\nlog_type all\n"
            )
        process = subprocess.Popen(
            [MOSQUITTO, "-c", conf_path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=1),
                ):
                    break
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError(f"mosquitto did not start on port {port}")
                time.sleep(0.05)
            yield port, log_path
        finally:
            process.terminate()
            process.wait(10)


@tagged("post_install", "-at_install")
class TestBroker(MqttCase):
    def test_defaults(self):
        broker = self.env["mqtt.broker"].create({"name": "Defaults", "host": "example.com"})
        self.assertEqual(broker.port, 1883)
        self.assertEqual(broker.keepalive, 60)
        self.assertFalse(broker.clean_start)
        self.assertEqual(broker.session_expiry, 604800)
        self.assertEqual(broker.receive_maximum, 2000)
        self.assertEqual(broker.max_payload_size, 10485760)
        self.assertTrue(broker.enabled)
        self.assertTrue(broker.active)
        self.assertEqual(broker.company_id, self.env.company)
        self.assertEqual((broker.protocol, broker.transport, broker.will_qos), ("5", "tcp", "0"))
        self.assertFalse(broker.tls_insecure, "certificate verification is on by default")

    def test_client_id_generated_and_stable(self):
        broker = self.broker
        self.assertRegex(broker.client_id, r"^mqtt-listener-[0-9a-f]{12}$")
        scope = self.env["ir.config_parameter"].sudo().get_param("database.uuid")
        expected = engine_config.BrokerConfig(id=broker.id).effective_client_id(scope)
        self.assertEqual(broker.client_id, expected, "the engine derives the same id")
        broker.write({"host": "localhost", "port": 1884})
        self.assertEqual(broker.client_id, expected, "a change of settings keeps the id")
        copy = broker.copy()
        self.assertRegex(copy.client_id, r"^mqtt-listener-[0-9a-f]{12}$")
        self.assertNotEqual(copy.client_id, broker.client_id, "a copy never shares the id")
        chosen = self.create_broker(client_id="my-own-id")
        self.assertEqual(chosen.client_id, "my-own-id")
        chosen.client_id = False
        self.assertEqual(
            chosen.client_id,
            engine_config.BrokerConfig(id=chosen.id).effective_client_id(scope),
            "an emptied client id is generated again",
        )

    def test_neutralize(self):
        """A neutralized copy stops listening and never reuses production's client ids."""
        before = self.broker.client_id
        with tools.file_open("mqtt_listener/data/neutralize.sql") as sql:
            self.env.cr.execute(sql.read())
        self.env.invalidate_all()
        self.assertFalse(self.broker.enabled)
        self.assertRegex(self.broker.client_id, r"^mqtt-listener-[0-9a-f]{12}$")
        self.assertNotEqual(self.broker.client_id, before)
        self.assertEqual(self.env["mqtt.service"]._get_service().desired_state, "stopped")

    def test_number_constraints(self):
        cases = [
            ({"port": 0}, "between 1 and 65535"),
            ({"port": 65536}, "between 1 and 65535"),
            ({"keepalive": -1}, "keepalive"),
            ({"session_expiry": -1}, "cannot be negative"),
            ({"receive_maximum": 0}, "receive maximum"),
            ({"max_payload_size": 0}, "at least 1 byte"),
        ]
        for values, message in cases:
            with self.subTest(values=values), self.assertRaisesRegex(ValidationError, message):
                self.create_broker(**values)
        self.create_broker(port=65535, keepalive=0, session_expiry=0)

    def test_pem_constraints(self):
        with self.assertRaisesRegex(ValidationError, "CA certificate must be PEM"):
            self.create_broker(tls=True, tls_ca_cert="not a certificate")
        with self.assertRaisesRegex(ValidationError, "client certificate must be PEM"):
            self.create_broker(tls=True, tls_client_cert="MIIB", tls_client_key=KEY)
        with self.assertRaisesRegex(ValidationError, "private key must be unencrypted PEM"):
            self.create_broker(tls=True, tls_client_cert=CERT, tls_client_key=CERT)
        encrypted = KEY.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY")
        with self.assertRaisesRegex(ValidationError, "unencrypted"):
            self.create_broker(tls=True, tls_client_cert=CERT, tls_client_key=encrypted)
        with self.assertRaisesRegex(ValidationError, "go together"):
            self.create_broker(tls=True, tls_client_cert=CERT)
        broker = self.create_broker(
            tls=True, tls_ca_cert=CERT + CERT, tls_client_cert=CERT, tls_client_key=KEY
        )
        self.assertEqual(broker.tls_client_key, KEY)

    def test_will_and_websocket_constraints(self):
        with self.assertRaisesRegex(ValidationError, "will topic"):
            self.create_broker(will_topic="status/+")
        with self.assertRaisesRegex(ValidationError, "WebSocket path"):
            self.create_broker(transport="websockets", ws_path="mqtt")
        self.create_broker(transport="websockets", ws_path="/mqtt", will_topic="status/odoo")

    def test_engine_config(self):
        self.broker.write(
            {
                "username": "odoo",
                "password": "s3cret",
                "will_topic": "status/odoo",
                "will_payload": "gone",
                "will_qos": "1",
                "protocol": "311",
            }
        )
        row = self.broker._engine_row()
        self.assertEqual(set(row), set(schema.BROKER.columns))
        config = self.broker._engine_config()
        self.assertEqual(config.id, self.broker.id)
        self.assertEqual((config.host, config.port), ("127.0.0.1", CLOSED_PORT))
        self.assertEqual((config.username, config.password), ("odoo", "s3cret"))
        self.assertEqual(config.client_id, self.broker.client_id)
        self.assertEqual(config.protocol, "311")
        self.assertEqual(config.company_id, self.env.company.id)
        self.assertEqual(config.will, engine_config.WillConfig("status/odoo", b"gone", 1, False))
        self.assertNotIn("s3cret", repr(config), "the password never reaches a log line")

    def test_runtime_state(self):
        broker = self.broker
        self.assertEqual(broker.state, "unknown", "no runner report yet")
        now = fields.Datetime.now()
        self.env["mqtt.broker.state"].create(
            {
                "broker_id": broker.id,
                "state": "auth_failed",
                "state_since": now,
                "last_error": "not authorized",
                "messages_in": 7,
                "messages_out": 2,
                "rate_in": 1.5,
                "backlog": 3,
                "last_message_at": now,
                "subscribed": "test/# 1",
            }
        )
        broker.invalidate_recordset()
        self.assertEqual(broker.state, "auth_failed")
        self.assertEqual(broker.state_since, now)
        self.assertEqual(broker.last_error, "not authorized")
        self.assertEqual((broker.messages_in, broker.messages_out, broker.backlog), (7, 2, 3))
        self.assertEqual(broker.rate_in, 1.5)
        self.assertEqual(broker.last_message_at, now)

    def test_counts_and_smart_buttons(self):
        self.create_subscription(self.broker)
        self.create_message()
        self.create_message()
        self.assertEqual(self.broker.subscription_count, 2)
        self.assertEqual(self.broker.message_count, 2)
        action = self.broker.action_view_subscriptions()
        self.assertEqual(action["res_model"], "mqtt.subscription")
        self.assertEqual(action["domain"], [("broker_id", "=", self.broker.id)])
        action = self.broker.action_view_messages()
        self.assertEqual(action["res_model"], "mqtt.publish.signal.history")

    def test_start_stop_restart(self):
        self.broker.action_stop()
        self.assertFalse(self.broker.enabled)
        self.broker.action_start()
        self.assertTrue(self.broker.enabled)
        self.assertTrue(self.broker.action_restart())

    def test_test_connection_fails_in_plain_words(self):
        action = self.broker.action_test_connection()
        self.assertEqual(
            (action["type"], action["tag"]), ("ir.actions.client", "display_notification")
        )
        params = action["params"]
        self.assertEqual(params["type"], "danger")
        self.assertTrue(params["sticky"])
        self.assertIn("TCP", params["title"])
        self.assertIn(f"cannot connect to 127.0.0.1:{CLOSED_PORT}", params["message"])

    def test_test_connection_with_its_own_client_id(self):
        with mosquitto() as (port, log_path):
            self.broker.port = port
            action = self.broker.action_test_connection()
            with open(log_path) as log:
                log_text = log.read()
        self.assertEqual(action["params"]["type"], "success", action["params"]["message"])
        self.assertIn("subscribe: 'test/#' granted", action["params"]["message"])
        self.assertIn(f"{self.broker.client_id}-check", log_text)
        self.assertNotRegex(log_text, rf"\b{re.escape(self.broker.client_id)}\b(?!-check)")


@tagged("post_install", "-at_install")
class TestSubscription(MqttCase):
    def test_topic_filter_uses_the_engine_message(self):
        with self.assertRaises(topics.TopicError) as engine_error:
            topics.validate_filter("a/#/b")
        with self.assertRaises(ValidationError) as odoo_error:
            self.create_subscription(self.broker, topic_filter="a/#/b")
        self.assertIn(str(engine_error.exception), str(odoo_error.exception))
        with self.assertRaisesRegex(ValidationError, "'\\+' must occupy a whole level"):
            self.create_subscription(self.broker, topic_filter="a/b+")
        with self.assertRaisesRegex(ValidationError, "control character"):
            self.subscription.topic_filter = "a/\tb"

    def test_shared_subscription(self):
        with self.assertRaisesRegex(ValidationError, "Shared group field"):
            self.create_subscription(self.broker, topic_filter="$share/odoo/plant/#")
        with self.assertRaisesRegex(ValidationError, "share group may not contain"):
            self.create_subscription(self.broker, share_group="a/b")
        with self.assertRaisesRegex(ValidationError, "No local"):
            self.create_subscription(self.broker, share_group="odoo", no_local=True)
        shared = self.create_subscription(self.broker, topic_filter="plant/#", share_group="odoo")
        self.assertEqual(shared.display_name, "Test broker: $share/odoo/plant/# (QoS 1)")

    def test_dedup_key_required(self):
        for mode in ("property", "json"):
            with self.subTest(mode=mode), self.assertRaisesRegex(ValidationError, "needs a dedup"):
                self.create_subscription(self.broker, dedup_mode=mode)
        subscription = self.create_subscription(
            self.broker, qos="2", dedup_mode="json", dedup_key="meta.id"
        )
        self.assertEqual(subscription.dedup_key, "meta.id")

    def test_defaults_company_and_display_name(self):
        subscription = self.subscription
        self.assertEqual((subscription.qos, subscription.retain_handling), ("1", "0"))
        self.assertEqual(subscription.dedup_mode, "none")
        self.assertTrue(subscription.active)
        self.assertEqual(subscription.company_id, self.broker.company_id)
        self.assertEqual(subscription.display_name, "Test broker: test/# (QoS 1)")

    def test_broker_deletion_cascades(self):
        subscription = self.create_subscription(self.broker)
        self.broker.unlink()
        self.assertFalse(subscription.exists())


@tagged("post_install", "-at_install")
class TestMessages(MqttCase):
    def test_payload_pretty_json(self):
        message = self.create_message(payload=b'{"t": 21.5, "unit": "C"}')
        self.assertEqual(message.payload_pretty, json.dumps({"t": 21.5, "unit": "C"}, indent=2))
        # the web client reads binary fields with bin_size: the preview must still be the text
        values = message.with_context(bin_size=True).read(["payload_pretty", "payload"])[0]
        self.assertIn('"unit": "C"', values["payload_pretty"])

    def test_payload_binary_is_byte_exact(self):
        data = b"\x00\xff\xfebinary\x00"
        message = self.create_message(payload=data)
        self.assertEqual(base64.b64decode(message.payload), data)
        self.assertEqual(message.payload_pretty, message.payload_preview)
        self.assertNotIn("\x00", message.payload_pretty)

    def test_user_properties_follow_their_message(self):
        message = self.create_message(user_properties=[("id", "1"), ("id", "2"), ("src", "x")])
        self.assertEqual(message.user_property_ids.mapped("key"), ["id", "id", "src"])
        self.assertEqual(message.display_name, message.topic)
        properties = message.user_property_ids
        message.unlink()
        self.assertFalse(properties.exists())

    def test_dedup_key_unique_per_broker(self):
        self.create_message(dedup_key="m-1")
        other = self.create_broker(name="Other")
        self.create_message(dedup_key="m-1", broker=other)
        self.create_message()
        self.create_message()  # no key: never deduplicated
        with (
            self.assertRaises(psycopg2.IntegrityError),
            mute_logger("odoo.sql_db"),
            self.env.cr.savepoint(),
        ):
            self.create_message(dedup_key="m-1")
            self.env.flush_all()

    def test_company_from_broker(self):
        company = self.env["res.company"].create({"name": "Plant B"})
        broker = self.create_broker(company_id=company.id)
        self.assertEqual(self.create_message(broker=broker).company_id, company)

    def test_gc_old_messages(self):
        params = self.env["ir.config_parameter"].sudo()
        params.set_param("mqtt_listener.history_days", "10")
        old = {state: self.create_message(state=state) for state in ("processed", "failed")}
        old["queued"] = self.create_message(state="queued", direction="out")
        old_properties = self.create_message(state="sent", user_properties=[("k", "v")])
        old["sent"] = old_properties
        recent = self.create_message(state="processed")
        self.env.flush_all()
        ids = tuple(message.id for message in old.values())
        self.env.cr.execute(
            "UPDATE mqtt_publish_signal_history SET create_date = %s WHERE id IN %s",
            (fields.Datetime.now() - timedelta(days=11), ids),
        )
        properties = old_properties.user_property_ids
        self.assertEqual(self.env["mqtt.publish.signal.history"]._gc_old_messages(), 3)
        self.assertFalse((old["processed"] | old["failed"] | old["sent"]).exists())
        self.assertFalse(properties.exists(), "user properties go with their message")
        self.assertTrue(old["queued"].exists(), "an undelivered outgoing message is kept")
        self.assertTrue(recent.exists())
        params.set_param("mqtt_listener.history_days", "0")
        self.assertEqual(self.env["mqtt.publish.signal.history"]._gc_old_messages(), 0)


@tagged("post_install", "-at_install")
class TestRunnerAndState(MqttCase):
    def test_unique_names(self):
        self.env["mqtt.runner"].create({"name": "host:1"})
        with (
            self.assertRaises(psycopg2.IntegrityError),
            mute_logger("odoo.sql_db"),
            self.env.cr.savepoint(),
        ):
            self.env["mqtt.runner"].create({"name": "host:1"})
            self.env.flush_all()
        self.env["mqtt.broker.state"].create({"broker_id": self.broker.id})
        with (
            self.assertRaises(psycopg2.IntegrityError),
            mute_logger("odoo.sql_db"),
            self.env.cr.savepoint(),
        ):
            self.env["mqtt.broker.state"].create({"broker_id": self.broker.id})
            self.env.flush_all()

    def test_alive(self):
        runners = self.env["mqtt.runner"]
        fresh = runners.create({"name": "a:1", "heartbeat_at": fields.Datetime.now()})
        stale = runners.create(
            {"name": "a:2", "heartbeat_at": fields.Datetime.now() - timedelta(minutes=2)}
        )
        never = runners.create({"name": "a:3"})
        self.assertEqual((fresh.alive, stale.alive, never.alive), (True, False, False))
        self.assertEqual(runners.search([("alive", "=", True), ("name", "like", "a:")]), fresh)
        self.assertEqual(
            runners.search([("alive", "=", False), ("name", "like", "a:")]), stale | never
        )


@tagged("post_install", "-at_install")
class TestService(MqttCase):
    def test_single_record(self):
        service = self.env.ref("mqtt_listener.mqtt_service_main")
        self.assertEqual(self.env["mqtt.service"]._get_service(), service)
        self.assertEqual(self.env["mqtt.service"].search([]), service)
        with self.assertRaisesRegex(UserError, "one MQTT service per database"):
            self.env["mqtt.service"].create({})
        action = self.env["mqtt.service"].action_open_service()
        self.assertEqual((action["res_model"], action["res_id"]), ("mqtt.service", service.id))

    def test_recreated_when_missing(self):
        self.env.ref("mqtt_listener.mqtt_service_main").unlink()
        service = self.env["mqtt.service"]._get_service()
        self.assertEqual(service.desired_state, "running")
        self.assertEqual(self.env["mqtt.service"]._get_service(), service)

    def test_start_stop_on_the_empty_model(self):
        model = self.env["mqtt.service"]
        self.assertTrue(model.stop_mqtt_service())
        self.assertEqual(model._get_service().desired_state, "stopped")
        self.assertEqual(model.check_mqtt_status()["desired_state"], "stopped")
        self.assertIn("service is stopped", model.check_mqtt_status()["hint"])
        self.assertTrue(model.start_mqtt_service())
        self.assertEqual(model.check_mqtt_status()["desired_state"], "running")
        self.assertTrue(model.restart_mqtt_service())
        model.stop_mqtt_service()
        model.restart_mqtt_service()
        self.assertEqual(model._get_service().desired_state, "running", "restart also starts")

    def test_status_without_runner(self):
        self.env["mqtt.runner"].search([]).unlink()
        status = self.env["mqtt.service"].check_mqtt_status()
        self.assertEqual(status["database"], self.env.cr.dbname)
        self.assertFalse(status["runner_attached"])
        self.assertIsNone(status["runner"])
        self.assertEqual(status["standby_runners"], [])
        self.assertIn("No runner is attached", status["hint"])
        self.assertIn("server_wide_modules", status["hint"])
        self.assertIn("odoo-bin mqtt -c odoo.conf", status["hint"])
        brokers = {broker["id"]: broker for broker in status["brokers"]}
        self.assertEqual(brokers[self.broker.id]["state"], "unknown")
        self.assertEqual(brokers[self.broker.id]["name"], "Test broker")
        json.dumps(status)  # an operator's dict: plain values only

    def test_status_with_runners(self):
        runners = self.env["mqtt.runner"]
        runners.search([]).unlink()
        now = fields.Datetime.now()
        runners.create(
            {"name": "old:1", "role": "active", "heartbeat_at": now - timedelta(seconds=31)}
        )
        runners.create(
            {
                "name": "node1:42",
                "host": "node1",
                "pid": 42,
                "mode": "prefork",
                "role": "active",
                "started_at": now - timedelta(hours=1),
                "heartbeat_at": now,
                "last_error": "broker Test broker: connection refused",
            }
        )
        runners.create(
            {
                "name": "node2:7",
                "host": "node2",
                "pid": 7,
                "role": "standby",
                "mode": "standalone",
                "heartbeat_at": now,
            }
        )
        self.env["mqtt.broker.state"].create(
            {
                "broker_id": self.broker.id,
                "state": "connected",
                "backlog": 5,
                "subscribed": "test/# 1\nother 0",
            }
        )
        status = self.env["mqtt.service"].check_mqtt_status()
        self.assertTrue(status["runner_attached"])
        self.assertIsNone(status["hint"])
        self.assertEqual(
            status["runner"],
            {
                "host": "node1",
                "pid": 42,
                "mode": "prefork",
                "role": "active",
                "heartbeat_at": fields.Datetime.to_string(now),
                "started_at": fields.Datetime.to_string(now - timedelta(hours=1)),
            },
        )
        self.assertEqual([r["host"] for r in status["standby_runners"]], ["node2"])
        self.assertEqual(status["backlog"], 5)
        self.assertEqual(status["last_error"], "broker Test broker: connection refused")
        broker = next(b for b in status["brokers"] if b["id"] == self.broker.id)
        self.assertEqual(broker["state"], "connected")
        self.assertEqual(broker["subscribed"], ["test/# 1", "other 0"])
        json.dumps(status)

    def test_status_standby_only(self):
        runners = self.env["mqtt.runner"]
        runners.search([]).unlink()
        runners.create({"name": "n:1", "role": "standby", "heartbeat_at": fields.Datetime.now()})
        status = self.env["mqtt.service"].check_mqtt_status()
        self.assertFalse(status["runner_attached"])
        self.assertIn("standing by", status["hint"])


@tagged("post_install", "-at_install")
class TestHooks(MqttCase):
    def test_post_init_hook(self):
        with self.assertLogs("odoo.addons.mqtt_listener", logging.INFO) as logs:
            hooks._post_init_hook(self.env)
        self.assertIn(
            f"MQTT service enabled for database {self.env.cr.dbname}; the runner starts "
            "listening once the install is committed",
            logs.output[0],
        )

    def test_uninstall_hook_stops_this_database(self):
        with self.assertLogs("odoo.addons.mqtt_listener", logging.INFO):
            hooks._uninstall_hook(self.env)
        self.assertEqual(self.env["mqtt.service"]._get_service().desired_state, "stopped")

    def test_missing_model_warning(self):
        env = types.SimpleNamespace(registry={}, cr=types.SimpleNamespace(dbname="nodb"))
        with self.assertLogs("odoo.addons.mqtt_listener", logging.WARNING) as logs:
            self.assertIsNone(hooks.service_model_or_warn(env))
        self.assertIn("'mqtt.service' not present in environment for database nodb", logs.output[0])
        self.assertEqual(hooks.service_model_or_warn(self.env), self.env["mqtt.service"])


@tagged("post_install", "-at_install")
class TestNotify(MqttCase):
    """NOTIFY reaches a listening runner when, and only when, the change is committed.

    The test transaction never commits, so these tests use a second, real cursor, as a runner
    would see it, and listen on a third connection; they leave the database as they found it.
    """

    def setUp(self):
        super().setUp()
        dbname, info = sql_db.connection_info_for(self.env.cr.dbname)
        self.listener = psycopg2.connect(**info)
        self.addCleanup(self.listener.close)
        self.listener.set_isolation_level(ISOLATION_LEVEL_AUTOCOMMIT)
        self.listener.cursor().execute(f"LISTEN {schema.NOTIFY_CHANNEL}")
        self.cr2 = sql_db.db_connect(dbname).cursor()
        self.addCleanup(self.cr2.close)
        self.cr2.execute("SET lock_timeout = '5s'")
        self.env2 = api.Environment(self.cr2, SUPERUSER_ID, {})

    def received(self, wait=2.0):
        """The payloads notified within ``wait`` seconds: those of the first commit that came."""
        deadline = time.monotonic() + wait
        payloads = []
        while (remaining := deadline - time.monotonic()) > 0:
            select.select([self.listener], [], [], remaining)
            self.listener.poll()
            while self.listener.notifies:
                notify = self.listener.notifies.pop(0)
                self.assertEqual(notify.channel, schema.NOTIFY_CHANNEL)
                payloads.append(notify.payload)
            if payloads:  # one commit's notifications arrive together; allow for stragglers
                deadline = min(deadline, time.monotonic() + 0.1)
        return payloads

    def test_delivered_at_commit_only(self):
        self.env2["mqtt.service"]._notify_runner("config")
        self.assertEqual(self.received(wait=0.3), [], "nothing before the commit")
        self.cr2.commit()
        self.assertEqual(self.received(), ["config"])

    def test_rolled_back_wakes_nobody(self):
        self.env2["mqtt.service"]._notify_runner("config")
        self.cr2.rollback()
        self.assertEqual(self.received(wait=0.5), [])

    def test_start_stop_notify_service(self):
        service_model = self.env2["mqtt.service"]
        initial = service_model._get_service().desired_state
        try:
            service_model.stop_mqtt_service()
            self.cr2.commit()
            self.assertEqual(self.received(), ["service"])
            service_model.start_mqtt_service()
            self.cr2.commit()
            self.assertEqual(self.received(), ["service"])
        finally:
            service_model._get_service().desired_state = initial
            self.cr2.commit()

    def test_broker_and_subscription_changes_notify_config(self):
        broker = self.env2["mqtt.broker"].create({"name": "Notify", "host": "127.0.0.1"})
        try:
            self.cr2.commit()
            self.assertEqual(self.received(), ["config"])
            subscription = self.env2["mqtt.subscription"].create(
                {"broker_id": broker.id, "topic_filter": "notify/#"}
            )
            self.cr2.commit()
            self.assertEqual(self.received(), ["config"])
            subscription.active = False
            self.cr2.commit()
            self.assertEqual(self.received(), ["config"])
            broker.action_restart()
            self.cr2.commit()
            self.assertEqual(self.received(), [f"restart:{broker.id}"])
            self.env2["mqtt.service"].restart_mqtt_service()
            self.cr2.commit()
            self.assertEqual(set(self.received()), {"service", "restart"})
        finally:
            broker.unlink()
            self.cr2.commit()
        self.assertEqual(self.received(), ["config"])
