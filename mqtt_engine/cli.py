"""The command line: ``mqtt-engine run | check | bench`` (also ``python -m mqtt_engine``).

``run``    a standalone listener. Brokers and subscriptions come from a TOML file (``--config``,
           see :mod:`.standalone`) or from flags (``--host``, ``--topic`` …); messages go to
           SQLite by default (``./mqtt-engine.sqlite3``) or to PostgreSQL (``--database
           postgresql://…``). Ends cleanly on SIGTERM or Ctrl-C; a progress line every
           ``--progress`` seconds says how many messages were stored.
``check``  connects with the given settings and reports plainly what works: DNS, TCP, TLS,
           authentication, subscribe; warns about broker settings that lose messages.
``bench``  the benchmark (see :mod:`.bench`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from . import __version__

_logger = logging.getLogger("mqtt_engine")


def _broker_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("broker")
    group.add_argument("--host", help="broker host name or address")
    group.add_argument("--port", type=int, help="broker port (1883, or 8883 with --tls)")
    group.add_argument("--protocol", choices=["5", "311"], default="5")
    group.add_argument("--websockets", action="store_true", help="MQTT over WebSocket")
    group.add_argument("--ws-path", default="/mqtt")
    group.add_argument("--tls", action="store_true", help="connect with TLS (verified)")
    group.add_argument("--ca-file", help="CA certificate(s) to verify the broker (PEM)")
    group.add_argument("--cert-file", help="client certificate (PEM)")
    group.add_argument("--key-file", help="client private key (PEM)")
    group.add_argument(
        "--insecure", action="store_true", help="TLS without certificate verification"
    )
    group.add_argument("--username")
    group.add_argument(
        "--password-env",
        metavar="VAR",
        help="read the password from this environment variable (never from a flag)",
    )
    group.add_argument("--client-id", default="", help="default: derived from database")
    group.add_argument("--keepalive", type=int, default=60)


def _read(path: str | None) -> str | None:
    if not path:
        return None
    with open(path) as handle:
        return handle.read()


def broker_from_flags(args: argparse.Namespace) -> dict:
    """The ``[[broker]]`` table the flags describe (as in a config file)."""
    values = {
        "name": args.host,
        "host": args.host,
        "port": args.port or (8883 if args.tls else 1883),
        "protocol": args.protocol,
        "transport": "websockets" if args.websockets else "tcp",
        "ws_path": args.ws_path,
        "tls": bool(args.tls),
        "tls_insecure": bool(args.insecure),
        "keepalive": args.keepalive,
        "client_id": args.client_id,
    }
    for flag, column in (
        ("ca_file", "tls_ca_cert"),
        ("cert_file", "tls_client_cert"),
        ("key_file", "tls_client_key"),
    ):
        text = _read(getattr(args, flag))
        if text:
            values[column] = text
    if args.username:
        values["username"] = args.username
    if args.password_env:
        if args.password_env not in os.environ:
            raise SystemExit(f"error: environment variable {args.password_env} is not set")
        values["password"] = os.environ[args.password_env]
    return values


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import Runner, tune_garbage_collector
    from .standalone import ConfigError, load_file, sync_to_store
    from .store import open_store

    config: dict = load_file(args.config) if args.config else {}
    if args.host:
        broker = broker_from_flags(args)
        broker["subscription"] = [
            {
                "topic_filter": topic,
                "qos": args.qos,
                **({"dedup_mode": "json", "dedup_key": args.dedup_json} if args.dedup_json else {}),
                **(
                    {"dedup_mode": "property", "dedup_key": args.dedup_property}
                    if args.dedup_property
                    else {}
                ),
            }
            for topic in args.topic
        ]
        config.setdefault("broker", []).append(broker)
    urls = args.database or ([config["database"]] if config.get("database") else None)
    urls = urls or ["sqlite:///mqtt-engine.sqlite3"]
    stores = [open_store(url) for url in urls]
    try:
        for store in stores:
            if not args.no_create:
                store.create_schema()
            if config.get("broker"):
                count = sync_to_store(store, config)
                _logger.info("database %s: %d broker(s) from the configuration", store.name, count)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runner = Runner(stores, mode="standalone", heartbeat=args.heartbeat)
    stop = threading.Event()

    def on_signal(signum, _frame):
        _logger.info("signal %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tune_garbage_collector()
    runner.start()
    _logger.info(
        "mqtt-engine %s running (pid %d); SIGTERM or Ctrl-C stops", __version__, os.getpid()
    )
    last = 0
    while not stop.wait(args.progress):
        total = sum(
            worker.pipeline.stored
            for database in runner.databases.values()
            for worker in list(database.workers.values())
        )
        if total != last:
            _logger.info("progress: %d messages stored (+%d)", total, total - last)
            last = total
    runner.stop()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check_broker
    from .config import broker_from_row

    if not args.host:
        print("error: --host is required", file=sys.stderr)
        return 2
    values = broker_from_flags(args)
    config = broker_from_row({"id": 0, **values})
    report = check_broker(
        config,
        client_id=args.client_id or f"mqtt-engine-check-{os.getpid()}",
        topic=args.topic[0] if args.topic else None,
        timeout=args.timeout,
    )
    print(report.summary())
    return 0 if report.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqtt-engine", description="Durable MQTT ingest and publish into a database."
    )
    parser.add_argument("--version", action="version", version=f"mqtt-engine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a standalone listener")
    run.add_argument("--config", help="TOML configuration file")
    run.add_argument(
        "--database",
        action="append",
        help="sqlite:///file.sqlite3 (default ./mqtt-engine.sqlite3) or postgresql://…; repeatable",
    )
    run.add_argument("--topic", action="append", default=[], help="topic filter; repeatable")
    run.add_argument("--qos", type=int, choices=[0, 1, 2], default=1)
    run.add_argument("--dedup-json", metavar="KEY", help="dedup key: this JSON key")
    run.add_argument("--dedup-property", metavar="NAME", help="dedup key: this user property")
    run.add_argument("--no-create", action="store_true", help="do not create missing tables")
    run.add_argument("--heartbeat", type=float, default=5.0, help="state write interval (s)")
    run.add_argument("--progress", type=float, default=10.0, help="progress line interval (s)")
    _broker_flags(run)
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check", help="test a broker connection step by step")
    check.add_argument("--topic", action="append", default=[], help="also try to subscribe")
    check.add_argument("--timeout", type=float, default=10.0)
    _broker_flags(check)
    check.set_defaults(func=cmd_check)

    bench = commands.add_parser("bench", help="measure ingest throughput and latency")
    from .bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = args.command == "check"  # its report is the output; log lines only with -v
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)
