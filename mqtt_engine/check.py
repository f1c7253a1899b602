"""``check``: connect with given settings and say plainly what works and what does not.

Each step runs only if the one before it worked, so the first failure is the answer:

1. DNS: the host name resolves;
2. TCP: the port accepts a connection;
3. TLS: the handshake succeeds and the certificate verifies (when TLS is on);
4. MQTT: the broker accepts the CONNECT (authentication);
5. subscribe: the broker grants a subscription to the given topic (optional).

It uses its own client id (never the listener's, so a running listener is not kicked off) and a
clean, non-persistent session, and warns about broker settings it can see that lose messages.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time

from .config import BrokerConfig
from .session import AUTH_FAILED, CONNECTED, SubscriptionSpec
from .tls import client_context


@dataclasses.dataclass
class CheckStep:
    name: str
    ok: bool
    detail: str


@dataclasses.dataclass
class CheckReport:
    steps: list[CheckStep] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(step.ok for step in self.steps)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.steps.append(CheckStep(name, ok, detail))
        return ok

    def summary(self) -> str:
        lines = [f"{'ok  ' if s.ok else 'FAIL'} {s.name}: {s.detail}" for s in self.steps]
        lines += [f"warn {w}" for w in self.warnings]
        verdict = "all checks passed" if self.ok else "the connection does not work"
        return "\n".join([*lines, verdict])


def check_broker(
    config: BrokerConfig, *, client_id: str, topic: str | None = None, timeout: float = 10.0
) -> CheckReport:
    """Run the steps of the module docstring against ``config``."""
    report = CheckReport()
    try:
        addresses = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        report.add("DNS", False, f"cannot resolve {config.host!r}: {exc.strerror}")
        return report
    shown = sorted({a[4][0] for a in addresses})
    report.add("DNS", True, f"{config.host} is {', '.join(shown[:3])}")
    try:
        sock = socket.create_connection((config.host, config.port), timeout=timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        report.add("TCP", False, f"cannot connect to {config.host}:{config.port}: {reason}")
        return report
    report.add("TCP", True, f"port {config.port} accepts connections")
    with sock:
        if config.tls:
            try:
                context = client_context(config)
                with context.wrap_socket(sock, server_hostname=config.host) as tls_sock:
                    detail = f"{tls_sock.version()}"
                    if config.tls_insecure:
                        detail += ", certificate NOT verified (insecure switch on)"
                    else:
                        detail += ", certificate verified"
                    report.add("TLS", True, detail)
            except ssl.SSLCertVerificationError as exc:
                report.add("TLS", False, f"certificate rejected: {exc.verify_message}")
                return report
            except (ssl.SSLError, OSError, ValueError) as exc:
                report.add("TLS", False, f"handshake failed: {exc}")
                return report
    _check_mqtt(config, client_id, topic, timeout, report)
    return report


def _check_mqtt(
    config: BrokerConfig, client_id: str, topic: str | None, timeout: float, report: CheckReport
) -> None:
    from .paho_session import PahoSession

    probe = dataclasses.replace(
        config, client_id=client_id, clean_start=True, session_expiry=0, will=None
    )
    broker_version: list[str] = []

    def on_message(message) -> None:
        if message.topic == "$SYS/broker/version":
            broker_version.append(message.payload.decode("utf-8", "replace"))

    session = PahoSession(
        probe,
        client_id=client_id,
        on_message=on_message,
        reconnect_min=timeout,
        reconnect_max=timeout,
        auth_retry=timeout,
    )
    session.start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and session.status.state not in (CONNECTED, AUTH_FAILED):
            time.sleep(0.05)
        status = session.status
        if status.state != CONNECTED:
            report.add("MQTT", False, status.last_error or f"no CONNACK within {timeout:.0f}s")
            return
        session.set_subscriptions([SubscriptionSpec("$SYS/broker/version", 0)])
        who = f"as {config.username!r}" if config.username else "anonymously"
        report.add(
            "MQTT", True, f"MQTT {'5' if config.is_v5 else '3.1.1'} connection accepted {who}"
        )
        if topic:
            session.set_subscriptions(
                [SubscriptionSpec("$SYS/broker/version", 0), SubscriptionSpec(topic, 1)]
            )
            while time.monotonic() < deadline:
                status = session.status
                if topic in status.subscribed or topic in status.failed_subscriptions:
                    break
                time.sleep(0.05)
            if topic in status.subscribed:
                report.add(
                    "subscribe", True, f"{topic!r} granted at QoS {status.subscribed[topic]}"
                )
            else:
                reason = status.failed_subscriptions.get(topic, f"no SUBACK within {timeout:.0f}s")
                report.add("subscribe", False, f"{topic!r} refused: {reason}")
        version_deadline = time.monotonic() + min(2.0, timeout)
        while not broker_version and time.monotonic() < version_deadline:
            time.sleep(0.05)  # a broker that publishes $SYS answers at once (retained)
        report.warnings.extend(_broker_warnings(config, broker_version[:1]))
    finally:
        session.stop()


def _broker_warnings(config: BrokerConfig, version: list[str]) -> list[str]:
    """Warnings about broker settings that lose messages, as far as we can tell."""
    warnings = []
    if config.clean_start:
        warnings.append(
            "clean start is on: the broker forgets the session, and every message sent while "
            "the listener is away, at each connection"
        )
    name = version[0] if version else "the broker does not say which it is"
    if not version or "mosquitto" in version[0].lower():
        warnings.append(
            f"{name}: mosquitto's max_queued_messages (default 1000) drops QoS 1/2 messages for "
            "an offline or slow listener beyond that count; set it large (10000000), and "
            "'persistence true' so that a broker restart keeps them"
        )
    return warnings
