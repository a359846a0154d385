"""DICOM TLS (PS3.15 B.1 Secure Transport Connection Profiles) for the SCP and for delivery.

TLS 1.2 at least, as BCP 195 asks (PS3.15 B.9); the certificate chain and the peers' CAs come
from PEM files named in the config. The SCP can require client certificates (mutual TLS);
delivery verifies the destination's certificate and host name, and can present a certificate.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.config import ConfigError, DestinationTls, ServerTls


def _load(ctx: ssl.SSLContext, certificate: Path | None, private_key: Path | None) -> None:
    if certificate is None:
        return
    try:
        ctx.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS: cannot load {certificate} / {private_key}: {e}") from None


def _trust(ctx: ssl.SSLContext, ca_certificates: Path | None) -> None:
    if ca_certificates is None:
        return
    try:
        ctx.load_verify_locations(ca_certificates)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS: cannot load CA certificates {ca_certificates}: {e}") from None


def server_context(tls: ServerTls) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, tls.certificate, tls.private_key)
    _trust(ctx, tls.ca_certificates)
    if tls.require_client_certificate:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: DestinationTls, host: str) -> tuple[ssl.SSLContext, str]:
    """A context and the name to verify, as pynetdicom's ``tls_args`` takes them."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_certificates is None:
        ctx.load_default_certs()
    else:
        _trust(ctx, tls.ca_certificates)
    _load(ctx, tls.certificate, tls.private_key)
    return ctx, tls.server_name or host
