"""Throwaway mosquitto brokers for tests: password, TLS, WebSocket and persistence setups.

``Mosquitto(directory, **options)`` writes a config into ``directory`` and runs
``/usr/sbin/mosquitto -c <config>`` on free 127.0.0.1 ports. Everything it needs (password file,
certificates, ACL file, persistence database, log) lives in that directory, so a test can read
the log afterwards and nothing leaks between tests.

Options:

- ``users``: ``{name: password}``; anonymous clients are refused when given. The password file
  is written with ``mosquitto_passwd -b`` when it is installed, else hashed here (PBKDF2-SHA512,
  the ``$7$`` format mosquitto 2.0 reads).
- ``tls``: a TLS listener (``tls_port``) with a CA, a server certificate for 127.0.0.1 and
  localhost, and a client certificate, all generated with the openssl CLI. Their PEM text is in
  ``ca_pem``, ``client_cert_pem`` and ``client_key_pem``. ``require_certificate`` makes the TLS
  listener refuse clients without a certificate signed by that CA.
- ``websockets``: a WebSocket listener on ``ws_port`` (path ``ws_path``). Debian's mosquitto
  2.0.11 is built without libwebsockets, so this is a small RFC 6455 bridge in this process that
  unwraps binary frames onto the plain TCP listener; the client's WebSocket transport is what
  the tests exercise, and that works the same against any broker.
- ``persistence``: keep ``mosquitto.db`` in the directory, so :meth:`restart` keeps sessions,
  subscriptions and queued messages. mosquitto writes it on a clean stop and every
  ``autosave_interval`` seconds (default 1800!), so :meth:`kill` loses what came since.
- ``acl``: the text of an ACL file (``acl_file``). mosquitto 2.0 grants every SUBSCRIBE under
  an ACL file and only filters at delivery; to have a SUBSCRIBE refused (SUBACK 0x87 / 0x80),
  use ``denied``.
- ``denied``: topic filters anonymous clients may neither subscribe to nor publish to, enforced
  by mosquitto's dynamic security plugin (not combined with ``users``).
- ``extra``: config text appended as is.

Settings that lose messages in a stock mosquitto 2.0, and what this config does about them:

- ``max_queued_messages`` (default 1000): QoS 1/2 messages beyond 1000 queued for a slow or
  offline persistent client are **silently dropped**. Ten million here: no limit in practice
  (0, "no limit", makes mosquitto before 2.0.22 hang up on a client after any refused PUBLISH:
  eclipse-mosquitto/mosquitto#3244).
- ``max_queued_bytes`` (default 0, no limit): when set, the same silent drop by size.
- ``persistence`` (default false): a broker restart forgets every session and every queued
  message. Off here unless asked; the machine's own broker has it on.
- ``autosave_interval`` (default 1800 s): with persistence, a crash (kill -9, power loss) loses
  everything queued since the last save.
- ``queue_qos0_messages`` (default false): QoS 0 messages for an offline client are dropped;
  that is QoS 0's contract, so it stays.
- ``max_inflight_messages`` (default 20) drops nothing but throttles a 3.1.1 subscriber to 20
  unacknowledged messages, which starves a consumer that acknowledges in batches after a commit
  (an MQTT 5 client's Receive Maximum is used instead). Set to 0 here (no limit).
- ``persistent_client_expiration`` (default never) and a client's MQTT 5 session expiry decide
  when an offline session, and all it has queued, is thrown away.

Methods: :meth:`start` (polls the ports with a deadline and fails with the log tail, never
sleep-and-hope), :meth:`stop` (SIGTERM), :meth:`kill` (SIGKILL, a crash), :meth:`restart` (on the
same ports), :meth:`pause` / :meth:`resume` (SIGSTOP / SIGCONT: a half-open connection) and
:meth:`log_text`. The readiness probe of :meth:`start` shows in the log as a "New connection" that
closes at once (on a TLS port also as an SSL error); count "New client connected" or refusals.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

from tests.support import LogFile

MOSQUITTO = "/usr/sbin/mosquitto"
DYNSEC_PLUGINS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True if a TCP connection to ``host:port`` is accepted."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def password_line(user: str, password: str) -> str:
    """A mosquitto 2.0 password file line (``$7$``: PBKDF2-HMAC-SHA512, 101 rounds)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    salt_b64 = base64.b64encode(salt).decode()
    digest_b64 = base64.b64encode(digest).decode()
    return f"{user}:$7$101${salt_b64}${digest_b64}"


class Mosquitto(LogFile):
    """One mosquitto process with its config, certificates and log in ``directory``."""

    def __init__(
        self,
        directory: pathlib.Path,
        *,
        users: dict[str, str] | None = None,
        tls: bool = False,
        require_certificate: bool = False,
        websockets: bool = False,
        ws_path: str = "/mqtt",
        persistence: bool = False,
        autosave_interval: int | None = None,
        acl: str | None = None,
        denied: tuple[str, ...] | list[str] = (),
        extra: str = "",
    ):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.tls = tls
        self.require_certificate = require_certificate
        self.websockets = websockets
        self.ws_path = ws_path
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.acl = acl
        self.denied = tuple(denied)
        self.extra = extra
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.ws_port = free_port() if websockets else None
        self.ca_pem = self.client_cert_pem = self.client_key_pem = None
        self.config_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        self._process: subprocess.Popen | None = None
        self._bridge: _WebSocketBridge | None = None
        self._prepared = False

    def __repr__(self) -> str:
        return f"<Mosquitto port={self.port} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ------------------------------------------------------------------ setup

    def _prepare(self) -> None:
        if self._prepared:
            return
        if self.users:
            self._write_passwords()
        if self.tls:
            self._make_certificates()
        if self.acl is not None:
            (self.directory / "acl").write_text(self.acl)
        if self.denied:
            self._write_dynsec()
        self.config_path.write_text(self._config_text())
        self._prepared = True

    def _write_passwords(self) -> None:
        path = self.directory / "passwords"
        path.write_text("")
        tool = shutil.which("mosquitto_passwd")
        for user, password in self.users.items():
            if tool:
                subprocess.run(
                    [tool, "-b", str(path), user, password],
                    check=True,
                    capture_output=True,
                    timeout=10,
                )
            else:
                with path.open("a") as handle:
                    handle.write(password_line(user, password) + "\n")
        path.chmod(0o600)

    def _write_dynsec(self) -> None:
        """Dynamic security config: everything allowed but the ``denied`` filters."""
        plugin = next((p for p in DYNSEC_PLUGINS if os.path.exists(p)), None)
        if plugin is None:
            raise RuntimeError(f"mosquitto's dynamic security plugin is not in {DYNSEC_PLUGINS}")
        acls = [
            {"acltype": kind, "topic": topic, "priority": 0, "allow": False}
            for topic in self.denied
            for kind in ("subscribePattern", "publishClientSend")
        ]
        settings = {
            "defaultACLAccess": {
                "publishClientSend": True,
                "publishClientReceive": True,
                "subscribe": True,
                "unsubscribe": True,
            },
            "clients": [],
            "roles": [{"rolename": "limited", "acls": acls}],
            "groups": [{"groupname": "anonymous", "roles": [{"rolename": "limited"}]}],
            "anonymousGroup": "anonymous",
        }
        (self.directory / "dynsec.json").write_text(json.dumps(settings, indent=1))
        self._plugin = plugin

    def _openssl(self, *args: str) -> None:
        result = subprocess.run(
            ["openssl", *args], cwd=self.directory, capture_output=True, text=True, timeout=30
        )
        if result.returncode:
            raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")

    def _make_certificates(self) -> None:
        """A CA, a server certificate (127.0.0.1, localhost) and a client certificate."""
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        self._openssl(
            *["req", "-x509", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2"],
            *key,
            *("-subj", "/CN=mqtt-engine test CA"),
            *("-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        )
        server_ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        for name, ext in (("server", server_ext), ("client", "extendedKeyUsage=clientAuth\n")):
            (self.directory / f"{name}.ext").write_text(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n" + ext
            )
            cn = "localhost" if name == "server" else "mqtt-engine test client"
            self._openssl(
                *f"req -new -keyout {name}.key -out {name}.csr".split(), *key, "-subj", f"/CN={cn}"
            )
            self._openssl(
                *f"x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial".split(),
                *f"-out {name}.crt -days 2 -extfile {name}.ext".split(),
            )
        for name in ("ca.key", "server.key", "client.key"):
            (self.directory / name).chmod(0o600)
        self.ca_pem = (self.directory / "ca.crt").read_text()
        self.client_cert_pem = (self.directory / "client.crt").read_text()
        self.client_key_pem = (self.directory / "client.key").read_text()

    def _config_text(self) -> str:
        d = self.directory
        lines = [
            "# generated by tests/mosquitto.py",
            "user root" if os.geteuid() == 0 else "",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "log_type unsubscribe",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "max_queued_messages 10000000",
            "max_inflight_messages 0",
            f"allow_anonymous {'false' if self.users else 'true'}",
        ]
        if self.users:
            lines.append(f"password_file {d / 'passwords'}")
        if self.acl is not None:
            lines.append(f"acl_file {d / 'acl'}")
        if self.denied:
            lines += [f"plugin {self._plugin}", f"plugin_opt_config_file {d / 'dynsec.json'}"]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {d}/"]
            if self.autosave_interval is not None:
                lines.append(f"autosave_interval {self.autosave_interval}")
        lines.append(f"listener {self.port} 127.0.0.1")
        if self.tls:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {d / 'ca.crt'}",
                f"certfile {d / 'server.crt'}",
                f"keyfile {d / 'server.key'}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
        lines.append(self.extra)
        return "\n".join(line for line in lines if line) + "\n"

    # -------------------------------------------------------------- lifecycle

    def start(self) -> Mosquitto:
        """Start the broker and wait until every listener accepts connections."""
        if self.running:
            return self
        self._prepare()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ports = [self.port] + ([self.tls_port] if self.tls else [])
        deadline = time.monotonic() + START_TIMEOUT
        while not all(port_open(port) for port in ports):
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"mosquitto did not listen within {START_TIMEOUT}s:\n{self.log_tail()}"
                )
            time.sleep(0.02)
        if self.websockets and self._bridge is None:
            self._bridge = _WebSocketBridge(self.ws_port, self.port, self.ws_path)
        return self

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence file) and wait; SIGKILL if it hangs."""
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        self._terminate()

    def _terminate(self) -> None:
        if not self.running:
            return
        self._process.send_signal(signal.SIGTERM)
        self._process.send_signal(signal.SIGCONT)  # a paused broker handles SIGTERM only then
        try:
            self._process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: a crash. Nothing is saved."""
        if self.running:
            self._process.kill()
            self._process.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop, then start again on the same ports (and the same WebSocket bridge)."""
        self._terminate()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a half-open link)."""
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._process.send_signal(signal.SIGCONT)

    # -------------------------------------------------------------------- log


class _WebSocketBridge:
    """RFC 6455 in front of a plain MQTT listener: one thread pair per connection.

    Accepts the upgrade only for ``path`` (anything else gets 404, so a wrong ``ws_path`` shows),
    echoes the ``mqtt`` subprotocol, unmasks client frames onto TCP and wraps every TCP read from
    the broker into one binary frame. Closing the bridge closes every connection through it.
    """

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, port: int, target_port: int, path: str):
        self.target_port = target_port
        self.path = path
        self._server = socket.create_server(("127.0.0.1", port))
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="ws-bridge", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._track(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = client.recv(4096)
                if not chunk:
                    return
                request += chunk
            head, _, rest = request.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:])
            }
            key = headers.get("sec-websocket-key")
            if path != self.path or not key:
                client.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest())
            client.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Protocol: mqtt\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            broker = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            broker.settimeout(None)
            self._track(broker)
            threading.Thread(
                target=self._broker_to_client, args=(broker, client), daemon=True
            ).start()
            self._client_to_broker(client, broker, bytearray(rest))
        except OSError:
            pass
        finally:
            client.close()

    def _client_to_broker(self, client, broker, buffer: bytearray) -> None:
        try:
            while True:
                frame = self._parse_frame(buffer)
                if frame is None:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                opcode, payload = frame
                if opcode == 0x8:  # close
                    return
                if opcode == 0x9:  # ping
                    client.sendall(self._frame(0xA, payload))
                elif opcode in (0x0, 0x2):
                    broker.sendall(payload)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                broker.shutdown(socket.SHUT_RDWR)

    def _broker_to_client(self, broker, client) -> None:
        try:
            while True:
                data = broker.recv(65536)
                if not data:
                    return
                client.sendall(self._frame(0x2, data))
        except OSError:
            pass
        finally:
            broker.close()
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _frame(opcode: int, payload: bytes) -> bytes:
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
        return header + payload

    @staticmethod
    def _parse_frame(buffer: bytearray) -> tuple[int, bytes] | None:
        """Take one complete frame off the front of ``buffer`` (None: need more bytes)."""
        if len(buffer) < 2:
            return None
        opcode = buffer[0] & 0x0F
        masked = buffer[1] & 0x80
        length = buffer[1] & 0x7F
        pos = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack_from("!H", buffer, 2)
            pos = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buffer, 2)
            pos = 10
        mask = b""
        if masked:
            if len(buffer) < pos + 4:
                return None
            mask = bytes(buffer[pos : pos + 4])
            pos += 4
        if len(buffer) < pos + length:
            return None
        payload = bytes(buffer[pos : pos + length])
        del buffer[: pos + length]
        if mask:
            key = (mask * (length // 4 + 1))[:length]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(
                length, "big"
            )
        return opcode, payload
