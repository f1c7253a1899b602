# ruff: noqa: F401  (imported for Odoo: the models register themselves, the hooks are looked up here)
from . import models
from .hooks import _auto_start_mqtt, _post_init_hook, _uninstall_hook
