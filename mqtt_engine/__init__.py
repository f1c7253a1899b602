"""mqtt_engine: durable MQTT ingest and publish into a database, without any framework.

The Odoo addon ``mqtt_listener`` runs on it; it also runs on its own (``python -m mqtt_engine``).
Nothing in this package imports Odoo.
"""

__version__ = "0.1.0"
