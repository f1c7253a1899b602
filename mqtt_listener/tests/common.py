"""Test helpers for this addon and for addons that build on it (a public test API).

``MqttCase`` is a :class:`~odoo.tests.TransactionCase` with one broker (``cls.broker``) and one
subscription (``cls.subscription``) that point at a closed local port, so nothing connects
anywhere unless a test starts a broker of its own. Its class methods create more of each, stored
messages and users with chosen groups::

    from odoo.addons.mqtt_listener.tests.common import MqttCase

    class TestMyHandler(MqttCase):
        def test_it(self):
            message = self.create_message(topic="plant/line1/temp", payload=b'{"t": 21.5}')
            ...
"""

import base64
import hashlib
import uuid

from mqtt_engine import payload as engine_payload

from odoo.tests import TransactionCase

CLOSED_PORT = 9
"""A local port nothing listens on (discard): connecting fails at once, nothing is sent."""


def unique_topic(prefix="test"):
    """A topic no other test (and no retained message) uses: ``<prefix>/<random hex>``."""
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


class MqttCase(TransactionCase):
    """A broker and a subscription, ready to use; helpers to create more."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.env = cls.env(context=dict(cls.env.context, tracking_disable=True))
        cls.broker = cls.create_broker()
        cls.subscription = cls.create_subscription(cls.broker, topic_filter="test/#")

    @classmethod
    def create_broker(cls, **values):
        """A broker on 127.0.0.1 (a closed port unless ``port`` is given)."""
        return cls.env["mqtt.broker"].create(
            {"name": "Test broker", "host": "127.0.0.1", "port": CLOSED_PORT, **values}
        )

    @classmethod
    def create_subscription(cls, broker, topic_filter=None, **values):
        """A subscription of ``broker`` (a unique topic unless ``topic_filter`` is given)."""
        return cls.env["mqtt.subscription"].create(
            {
                "broker_id": broker.id,
                "topic_filter": topic_filter or f"{unique_topic()}/#",
                **values,
            }
        )

    @classmethod
    def create_message(cls, topic=None, payload=b"", broker=None, user_properties=(), **values):
        """A stored message as the engine writes one (``payload`` as bytes, stored in base64).

        ``user_properties`` is a sequence of ``(key, value)`` pairs.
        """
        broker = broker if broker is not None else cls.broker
        vals = {
            "broker_id": broker.id,
            "direction": "in",
            "state": "received",
            "topic": topic or unique_topic(),
            "payload": base64.b64encode(payload),
            "payload_preview": engine_payload.preview(payload),
            "payload_size": len(payload),
            "payload_hash": hashlib.sha256(payload).hexdigest(),
            "qos": 1,
            "user_property_ids": [
                (0, 0, {"sequence": index, "key": key, "value": value})
                for index, (key, value) in enumerate(user_properties)
            ],
            **values,
        }
        return cls.env["mqtt.publish.signal.history"].create(vals)

    @classmethod
    def create_user(cls, login, groups=(), **values):
        """An internal (or, with ``base.group_portal`` / ``base.group_public``, external) user.

        ``groups`` are xml ids; a user without any gets ``base.group_user``.
        """
        group_ids = [cls.env.ref(xmlid).id for xmlid in groups or ("base.group_user",)]
        users = cls.env["res.users"]
        groups_field = "group_ids" if "group_ids" in users._fields else "groups_id"  # 19 / 17-18
        return users.with_context(no_reset_password=True).create(
            {
                "name": login.replace("_", " ").title(),
                "login": login,
                "email": f"{login}@example.com",
                groups_field: [(6, 0, group_ids)],
                **values,
            }
        )


def has_model_access(model, operation):
    """Whether the user of ``model``'s environment may ``operation`` on the model (ACLs only)."""
    if hasattr(model, "has_access"):  # Odoo 18 and later
        return model.browse().has_access(operation)
    return model.check_access_rights(operation, raise_exception=False)  # Odoo 17
