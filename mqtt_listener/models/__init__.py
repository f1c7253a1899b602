from . import (
    mqtt_broker,
    mqtt_broker_state,
    mqtt_publish_signal_history,
    mqtt_runner,
    mqtt_service,
    mqtt_subscription,
    mqtt_user_property,
)
