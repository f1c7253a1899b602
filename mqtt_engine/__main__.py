"""``python -m mqtt_engine``: the command line (see :mod:`mqtt_engine.cli`)."""

import sys

from .cli import main

sys.exit(main())
