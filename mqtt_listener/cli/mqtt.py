"""``odoo-bin --addons-path=… mqtt``: the MQTT listener as its own process, and its benchmark.

    odoo-bin --addons-path=… mqtt -c odoo.conf [-d db1,db2]     run the listener
    odoo-bin --addons-path=… mqtt bench -c odoo.conf -d db [--json] [--messages N]

``--addons-path=…`` must come first: that is how Odoo finds commands shipped in an addon.
``run`` serves every database given with ``-d`` (or ``db_name``), else every database where
mqtt_listener is installed; it stops cleanly on SIGTERM or Ctrl-C. See
``odoo.addons.mqtt_listener.server`` for the deployment modes.
"""

# Absolute imports only: Odoo 19 loads this file as odoo.cli.mqtt, outside the addon package.
# pylint: disable=odoo-addons-relative-import
import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from odoo.cli import Command
from odoo.tools import config

_logger = logging.getLogger("odoo.addons.mqtt_listener")


class Mqtt(Command):
    """Run the MQTT listener as its own process (``mqtt bench``: benchmark it)"""

    name = "mqtt"

    def run(self, cmdargs):
        bench = bool(cmdargs) and cmdargs[0] == "bench"
        if bench or (cmdargs and cmdargs[0] == "run"):
            cmdargs = cmdargs[1:]
        own = argparse.ArgumentParser(add_help=False)
        own.add_argument("--json", action="store_true")
        own.add_argument("--messages", type=int, default=20000)
        own.add_argument("--baseline-messages", type=int, default=2000)
        own.add_argument("--rate", type=int, default=2000)
        own.add_argument("--seconds", type=float, default=10.0)
        options, rest = own.parse_known_args(cmdargs)
        config.parser.prog = f"{Path(sys.argv[0]).name} {self.name}{' bench' if bench else ''}"
        config.parse_config(rest, setup_logging=True)
        from mqtt_engine.runner import tune_garbage_collector

        from odoo.addons.mqtt_listener.server.supervisor import (
            Supervisor,
            configured_databases,
        )

        if bench:
            from odoo.addons.mqtt_listener.server.bench import run_bench

            databases = configured_databases()
            if len(databases) != 1:
                sys.exit("mqtt bench: give exactly one database with -d")
            sys.exit(run_bench(databases[0], options))
        tune_garbage_collector()  # this process serves the runner alone
        supervisor = Supervisor("standalone", configured_databases() or None)
        stopping = threading.Event()

        def on_signal(signum, _frame):
            _logger.info("MQTT service: %s received, stopping", signal.Signals(signum).name)
            stopping.set()
            supervisor.stop(timeout=0)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        supervisor.start_thread()
        while not stopping.wait(1.0):
            pass
        supervisor.stop()
