"""TLS contexts for DICOM associations (PS3.15 Annex B: TLS 1.2 or later, certificates in PEM).

Used by the C-STORE SCU (``dicom+tls://`` destinations) and by ``sprim listen``.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class _LazyHandshakeContext(ssl.SSLContext):
    """A server context whose handshake runs on the first read, in the association's thread.

    pynetdicom wraps an accepted socket in its accept loop: with the default immediate handshake,
    one peer that connects and sends nothing would hold every other peer's association.
    """

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kw):  # type: ignore[override]
        return super().wrap_socket(sock, server_side, False, *args, **kw)


def server_context(
    cert: Path, key: Path | None = None, client_ca: Path | None = None
) -> ssl.SSLContext:
    """TLS context of a DICOM SCP: our certificate; with ``client_ca``, a client certificate
    signed by it is required (mutual TLS), else none is asked."""
    ctx = _LazyHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key) if key else None)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca_bundle: Path | None = None,
    *,
    verify: bool = True,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> ssl.SSLContext:
    """TLS context of a DICOM SCU: the peer's certificate and host name are checked against
    ``ca_bundle`` (unset: the system's CAs) unless ``verify`` is False."""
    ctx = ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert), str(client_key) if client_key else None)
    return ctx


def describe_tls_error(exc: BaseException) -> str | None:
    """Plain words for a TLS failure found in ``exc`` or its causes (None: not a TLS failure)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"the server's certificate is not trusted ({exc.verify_message})"
        if isinstance(exc, ssl.SSLError):
            return f"TLS handshake failed ({exc.reason or exc})"
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            detail = text.split("CERTIFICATE_VERIFY_FAILED]", 1)[-1].split("(_ssl", 1)[0]
            return f"the server's certificate is not trusted ({detail.strip(' ]')})"
        if "SSLError" in text or "SSL:" in text:
            return f"TLS handshake failed ({text[:200]})"
        exc = exc.__cause__ or exc.__context__ or (exc.args[0] if exc.args else None)
        if not isinstance(exc, BaseException):
            exc = None
        seen += 1
    return None
