"""End to end in a real Odoo: configure through the ORM, publish with paho, see the rows.

The listener under test is the engine's runner, started by the test on this database (no runner
starts by itself during tests). It works on its own connections, so everything it must see is
committed on a separate cursor, and everything it writes is read on a fresh one; what the tests
commit is removed again in the cleanup. The broker is the machine's mosquitto
(``MQTT_TEST_BROKER``, default 127.0.0.1:1883).
"""

import os
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_engine.payload import from_column
from mqtt_engine.runner import Runner
from mqtt_engine.store_pg import PostgresStore

from odoo import SUPERUSER_ID, api
from odoo.modules.registry import Registry
from odoo.tests import BaseCase, tagged
from odoo.tests.common import get_db_name

from odoo.addons.mqtt_listener.server.supervisor import database_dsn

BROKER_HOST, _, BROKER_PORT = os.environ.get("MQTT_TEST_BROKER", "127.0.0.1:1883").partition(":")
BROKER_PORT = int(BROKER_PORT or 1883)


@tagged("post_install", "-at_install")
class TestEndToEnd(BaseCase):
    """A runner on this database, a broker and subscriptions made through the ORM."""

    def setUp(self):
        super().setUp()
        self.dbname = get_db_name()
        self.registry = Registry(self.dbname)
        self.topic = f"odoo-e2e/{uuid.uuid4().hex[:10]}"
        with self.committed() as env:
            env["mqtt.service"]._get_service().desired_state = "running"
            self.broker_id = (
                env["mqtt.broker"]
                .create({"name": "E2E broker", "host": BROKER_HOST, "port": BROKER_PORT})
                .id
            )
            env["mqtt.subscription"].create(
                {"broker_id": self.broker_id, "topic_filter": f"{self.topic}/a/#", "qos": "1"}
            )
        self.addCleanup(self._remove_committed_rows)
        self.runner = Runner(
            [PostgresStore(database_dsn(self.dbname), name=self.dbname)],
            mode="test",
            heartbeat=0.5,
        )
        self.runner.start()
        self.addCleanup(self.runner.stop)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"e2e-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        connected = threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.connect(BROKER_HOST, BROKER_PORT)
        self.client.loop_start()
        self.addCleanup(self.client.loop_stop)
        self.addCleanup(self.client.disconnect)
        self.assertTrue(connected.wait(10), "the test publisher could not connect")

    # -- helpers ------------------------------------------------------------------------------

    def committed(self):
        """A context giving a superuser env on a new cursor, committed at the end."""
        test = self

        class Committed:
            def __enter__(self):
                self.cr = test.registry.cursor()
                return api.Environment(self.cr, SUPERUSER_ID, {})

            def __exit__(self, kind, value, traceback):
                if kind is None:
                    # the runner, on connections of its own, must see it
                    self.cr.commit()  # pylint: disable=invalid-commit
                self.cr.close()

        return Committed()

    def _remove_committed_rows(self):
        with self.committed() as env:
            broker = env["mqtt.broker"].browse(self.broker_id).exists()
            env["mqtt.publish.signal.history"].search([("broker_id", "=", self.broker_id)]).unlink()
            broker.unlink()
            env["mqtt.service"]._get_service().desired_state = "running"

    def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            with self.committed() as env:
                value = predicate(env)
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.1)

    def subscribed(self, topic_filter):
        def check(env):
            broker = env["mqtt.broker"].browse(self.broker_id)
            return broker.state == "connected" and topic_filter in (broker.subscribed or "")

        return check

    def messages(self, env):
        return env["mqtt.publish.signal.history"].search(
            [("broker_id", "=", self.broker_id), ("direction", "=", "in")], order="id"
        )

    def publish(self, topic, payload, properties=None):
        self.client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(10)

    # -- tests --------------------------------------------------------------------------------

    def test_messages_and_user_properties_are_stored(self):
        self.wait_for(self.subscribed(f"{self.topic}/a/#"), 20, "the subscription")
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [("site", "plant-1"), ("unit", "kg")]
        self.publish(f"{self.topic}/a/scale", b'{"kg": 12.5}', properties)
        self.publish(f"{self.topic}/a/raw", b"\x00\xff\xfebinary")

        def two(env):
            found = self.messages(env)
            return len(found) == 2 and [
                (m.topic, from_column(m.payload), m.state, m.subscription_id.topic_filter,
                 [(p.key, p.value) for p in m.user_property_ids])
                for m in found
            ]  # fmt: skip

        self.assertEqual(
            self.wait_for(two, 20, "two stored messages"),
            [
                (f"{self.topic}/a/scale", b'{"kg": 12.5}', "received", f"{self.topic}/a/#",
                 [("site", "plant-1"), ("unit", "kg")]),
                (f"{self.topic}/a/raw", b"\x00\xff\xfebinary", "received", f"{self.topic}/a/#",
                 []),
            ],
        )  # fmt: skip

    def test_a_subscription_added_while_running_is_live(self):
        self.wait_for(self.subscribed(f"{self.topic}/a/#"), 20, "the first subscription")
        with self.committed() as env:
            env["mqtt.subscription"].create(
                {"broker_id": self.broker_id, "topic_filter": f"{self.topic}/b", "qos": "1"}
            )
        self.wait_for(self.subscribed(f"{self.topic}/b"), 10, "the added subscription")
        self.publish(f"{self.topic}/b", b"live")
        found = self.wait_for(lambda env: self.messages(env).mapped("topic"), 10, "the message")
        self.assertEqual(found, [f"{self.topic}/b"])

    def test_stop_and_start_from_the_service_obey(self):
        self.wait_for(self.subscribed(f"{self.topic}/a/#"), 20, "the subscription")
        with self.committed() as env:
            env["mqtt.service"].stop_mqtt_service()
        self.wait_for(
            lambda env: env["mqtt.broker"].browse(self.broker_id).state == "stopped",
            10,
            "the broker to stop",
        )
        with self.committed() as env:
            status = env["mqtt.service"].check_mqtt_status()
        self.assertEqual(status["desired_state"], "stopped")
        self.assertTrue(status["runner_attached"])
        # Stopped, the persistent session keeps what arrives; Start delivers it.
        self.publish(f"{self.topic}/a/while-stopped", b"kept")
        with self.committed() as env:
            self.assertFalse(self.messages(env))
            env["mqtt.service"].start_mqtt_service()
        found = self.wait_for(
            lambda env: self.messages(env).mapped("payload_preview"), 20, "the kept message"
        )
        self.assertEqual(found, ["kept"])

        def connected_status(env):
            status = env["mqtt.service"].check_mqtt_status()
            states = [b["state"] for b in status["brokers"] if b["id"] == self.broker_id]
            return states == ["connected"] and status

        status = self.wait_for(connected_status, 10, "check_mqtt_status to say connected")
        self.assertEqual(status["desired_state"], "running")
        self.assertEqual(status["runner"]["mode"], "test")
