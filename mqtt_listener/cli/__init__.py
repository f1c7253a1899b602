from . import mqtt
