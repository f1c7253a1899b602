"""TLS contexts for broker connections: certificates verified unless explicitly switched off.

Certificates come as PEM text (that is how Odoo stores them). The CA is loaded from memory;
the client certificate and key must go through files for :meth:`ssl.SSLContext.load_cert_chain`,
so they are written to a private (0600) temporary directory, loaded, and removed at once.
"""

from __future__ import annotations

import os
import ssl
import tempfile

from .config import BrokerConfig


class TlsSettingsError(ValueError):
    """The TLS settings cannot be used (a CA or key that does not parse); says which."""


def ssl_reason(exc: BaseException) -> str:
    """The readable part of an ssl error ("certificate verify failed: ..." or the reason)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return exc.verify_message
    reason = getattr(exc, "reason", None)
    text = str(exc)
    if reason and text.startswith("["):
        return f"{reason.replace('_', ' ').lower()} ({text})"
    return text


def client_context(config: BrokerConfig) -> ssl.SSLContext:
    """An SSL context for ``config``: system CAs, or only ``tls_ca_cert`` when given."""
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cadata=config.tls_ca_cert or None
        )
    except (ssl.SSLError, ValueError) as exc:
        raise TlsSettingsError(
            f"TLS: the CA certificate cannot be read: {ssl_reason(exc)}"
        ) from None
    if config.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.tls_client_cert:
        with tempfile.TemporaryDirectory(prefix="mqtt-tls-") as directory:
            certfile = os.path.join(directory, "client.crt")
            keyfile = os.path.join(directory, "client.key") if config.tls_client_key else None
            for path, text in (
                (certfile, config.tls_client_cert),
                (keyfile, config.tls_client_key),
            ):
                if path is not None:
                    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(descriptor, "w") as handle:
                        handle.write(text)
            try:
                context.load_cert_chain(certfile, keyfile)
            except (ssl.SSLError, ValueError, OSError) as exc:
                raise TlsSettingsError(
                    "TLS: the client certificate or key cannot be loaded (not PEM, not a "
                    f"matching pair, or an encrypted key): {ssl_reason(exc)}"
                ) from None
    return context
