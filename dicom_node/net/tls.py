"""TLS contexts for DICOM (PS3.15 Annex B.1, Basic TLS Secure Transport Connection).

Safe defaults: TLS 1.2 or newer, Python's default cipher selection (forward-secret
AEAD suites), server certificates verified against the configured or system CAs with
host-name checking. Mutual TLS on the listener when ``ca_certificates`` is set.
"""

from __future__ import annotations

import ssl

from dicom_node.config import DestinationTLS, ListenerTLS
from dicom_node.errors import ConfigError

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _common(ctx: ssl.SSLContext, min_version: str, ciphers: str | None) -> None:
    ctx.minimum_version = _VERSIONS[min_version]
    if ciphers:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError as exc:
            raise ConfigError(f"tls.ciphers: no usable cipher in {ciphers!r}") from exc


def server_context(tls: ListenerTLS) -> ssl.SSLContext:
    """The listener's context; requires client certificates when a CA is configured."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, tls.min_version, tls.ciphers)
    try:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
        if tls.ca_certificates is not None:
            ctx.load_verify_locations(str(tls.ca_certificates))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"node.tls: cannot load the certificate, key or CA: {exc}") from exc
    return ctx


def client_context(tls: DestinationTLS) -> ssl.SSLContext:
    """A destination's context: verifies the server unless told not to."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _common(ctx, tls.min_version, tls.ciphers)
    try:
        if tls.ca_certificates is not None:
            ctx.load_verify_locations(str(tls.ca_certificates))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if tls.certificate is not None:
            ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"destination tls: cannot load the certificate, key or CA: {exc}") from exc
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
