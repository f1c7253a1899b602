from . import cli, models
from .hooks import _auto_start_mqtt, _post_init_hook, _uninstall_hook
