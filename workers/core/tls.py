"""TLS contexts for DICOM associations (PS3.15 Annex B: TLS 1.2 or later, certificates in PEM).

Used by the C-STORE SCU (``dicom+tls://`` destinations) and by ``sprim listen``.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path


def server_context(
    cert: Path, key: Path | None = None, client_ca: Path | None = None
) -> ssl.SSLContext:
    """TLS context of a DICOM SCP: our certificate; with ``client_ca``, a client certificate
    signed by it is required (mutual TLS), else none is asked. The SCP handshakes on the
    association's own thread, under its network timeout (:mod:`workers.ingest.scp`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
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


_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")


def describe_tls_error(exc: BaseException) -> str | None:
    """Plain words for a TLS failure found in ``exc`` or its causes (None: not a TLS failure).

    The words say whose side is wrong: "not trusted" (our CA bundle), "requires a client
    certificate" / "refused sprim's client certificate" (our client certificate), else the
    handshake failed with OpenSSL's reason.
    """
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return f"the server's certificate is not trusted ({cur.verify_message})"
        text = str(cur)
        reason = cur.reason if isinstance(cur, ssl.SSLError) else None
        m = _REASON.search(text)
        reason = reason or (m.group(1) if m else None)
        if reason or "SSLError" in text:
            if reason == "CERTIFICATE_VERIFY_FAILED":
                detail = text.split("CERTIFICATE_VERIFY_FAILED]", 1)[-1].split("(_ssl", 1)[0]
                return f"the server's certificate is not trusted ({detail.strip(' ]')})"
            if reason and "CERTIFICATE_REQUIRED" in reason:
                return f"the server requires a client certificate ({reason})"
            if reason and ("BAD_CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
                return f"the server refused sprim's client certificate ({reason})"
            if (
                isinstance(cur, ssl.SSLEOFError)
                or "EOF occurred" in text
                or (reason and "UNEXPECTED_EOF" in reason)
            ):
                # TLS 1.3: a server that wants a client certificate may just close (its alert
                # can be lost with the connection); a plain-text port does the same.
                return (
                    "the server closed the TLS handshake: it may require a client certificate, "
                    "or not speak TLS on this port"
                )
            return f"TLS handshake failed ({reason or text[:200]})"
        nxt = cur.__cause__ or cur.__context__ or (cur.args[0] if cur.args else None)
        cur = nxt if isinstance(nxt, BaseException) else None
        seen += 1
    return None


def tls_advice(why: str, variables: str) -> tuple[str, bool]:
    """(what to set, transient) for a :func:`describe_tls_error` text; ``variables`` is the
    archive's variable prefix, e.g. ``SPRIM_ARCHIVE_PACS_``."""
    if "not trusted" in why:
        return (
            f"set {variables}CA_BUNDLE to the PEM of the CA that signed the archive's certificate",
            False,
        )
    if "client certificate" in why:
        return (
            f"set {variables}CLIENT_CERT and {variables}CLIENT_KEY to a certificate the archive "
            "trusts",
            False,
        )
    return "check the archive's TLS set-up", True
