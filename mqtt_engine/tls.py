"""TLS contexts for broker connections: certificates verified unless explicitly switched off.

Certificates come as PEM text (that is how Odoo stores them). The CA is loaded from memory;
the client certificate and key must go through files for :meth:`ssl.SSLContext.load_cert_chain`,
so they are written to a private (0600) temporary directory and removed at once.
"""

from __future__ import annotations

import os
import ssl
import tempfile

from .config import BrokerConfig


def client_context(config: BrokerConfig) -> ssl.SSLContext:
    """An SSL context for ``config``: system CAs, or only ``tls_ca_cert`` when given."""
    if config.tls_ca_cert:
        context = ssl.create_default_context(cadata=config.tls_ca_cert)
    else:
        context = ssl.create_default_context()
    if config.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.tls_client_cert:
        with tempfile.TemporaryDirectory(prefix="mqtt-tls-") as directory:
            os.chmod(directory, 0o700)
            cert_path = os.path.join(directory, "client.pem")
            key_path = os.path.join(directory, "client.key")
            for path, text in (
                (cert_path, config.tls_client_cert),
                (key_path, config.tls_client_key),
            ):
                if text:
                    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    with os.fdopen(descriptor, "w") as handle:
                        handle.write(text)
            context.load_cert_chain(cert_path, key_path if config.tls_client_key else None)
    return context
