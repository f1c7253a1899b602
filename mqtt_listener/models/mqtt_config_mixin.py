"""What the runner follows live: any change to these records wakes it after the commit."""

from odoo import api, models


class MqttConfigMixin(models.AbstractModel):
    _name = "mqtt.config.mixin"
    _description = "MQTT configuration the runner follows"

    @api.model_create_multi
    def create(self, vals_list):
        records = super().create(vals_list)
        self.env["mqtt.service"]._notify_runner("config")
        return records

    def write(self, vals):
        result = super().write(vals)
        self.env["mqtt.service"]._notify_runner("config")
        return result

    def unlink(self):
        result = super().unlink()
        self.env["mqtt.service"]._notify_runner("config")
        return result
