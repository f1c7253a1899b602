# Sourced by scripts/test and scripts/run: make .venv hold the engine and its test tools.
if [ ! -x .venv/bin/python ]; then
  printf '\n==> creating .venv\n'
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import mqtt_engine, paho.mqtt, psycopg2, pytest, pytest_timeout, ruff, pylint_odoo" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  printf '\n==> installing the engine and its test tools into .venv\n'
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q -e '.[postgres,test]'
  touch .venv/.installed
fi
