from . import mqtt_config_mixin  # first: mqtt.broker and mqtt.subscription inherit it

# isort: split
from . import (
    mqtt_broker,
    mqtt_broker_state,
    mqtt_publish_signal_history,
    mqtt_runner,
    mqtt_service,
    mqtt_subscription,
    mqtt_user_property,
)
