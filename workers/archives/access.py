"""An archive's credentials and TLS applied to its connections (settings:
:class:`workers.core.config.ArchiveAccess`).

Secrets stay in :class:`pydantic.SecretStr` until a request header is built: sessions, auth
objects and archives print without them, and error messages name the variables, not values.
"""

from __future__ import annotations

import base64
import logging
import ssl
import types
import warnings

import requests
from requests.auth import AuthBase

from workers.core.config import ArchiveAccess
from workers.core.tls import client_context

log = logging.getLogger(__name__)


class _Basic(AuthBase):
    """HTTP basic authentication whose password is never in a repr."""

    def __init__(self, access: ArchiveAccess) -> None:
        self._access = access

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        user = self._access.username or ""
        pw = self._access.secret("password")
        token = base64.b64encode(f"{user}:{pw}".encode()).decode()
        r.headers["Authorization"] = f"Basic {token}"
        return r

    def __repr__(self) -> str:
        return f"Basic(user={self._access.username!r}, password=***)"


class _Bearer(AuthBase):
    """``Authorization: Bearer`` with a token that is never in a repr."""

    def __init__(self, access: ArchiveAccess) -> None:
        self._access = access

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._access.secret('token')}"
        return r

    def __repr__(self) -> str:
        return "Bearer(***)"


def configure_session(session: requests.Session, access: ArchiveAccess, name: str) -> None:
    """Credentials (basic or bearer) and certificate checks of ``access`` on ``session``."""
    if access.token is not None:
        session.auth = _Bearer(access)
    elif access.username:
        session.auth = _Basic(access)
    if not access.tls_verify:
        log.warning(
            "event=tls_verify_off archive=%s hint=%sTLS_VERIFY=false: the archive's certificate "
            "is not checked", name, access.variables,
        )  # fmt: skip
        session.verify = False
        warnings.filterwarnings("ignore", message="Unverified HTTPS request")
    elif access.ca_bundle is not None:
        session.verify = str(access.ca_bundle)
    if session.verify is not True:
        session.merge_environment_settings = types.MethodType(_own_verify_first, session)  # type: ignore[method-assign]
    if access.client_cert is not None:
        session.cert = (
            (str(access.client_cert), str(access.client_key))
            if access.client_key
            else str(access.client_cert)
        )


def _own_verify_first(self, url, proxies, stream, verify, cert):
    """requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` (set system-wide on many hosts)
    override a session's ``verify``: the archive's own CA bundle would be silently ignored."""
    out = requests.Session.merge_environment_settings(self, url, proxies, stream, verify, cert)
    if verify is None:
        out["verify"] = self.verify
    return out


def dicom_tls_context(access: ArchiveAccess) -> ssl.SSLContext:
    """TLS context of a C-STORE association to this archive (``dicom+tls://``)."""
    return client_context(
        access.ca_bundle,
        verify=access.tls_verify,
        client_cert=access.client_cert,
        client_key=access.client_key,
    )


def http_session(access: ArchiveAccess, name: str) -> requests.Session:
    """A new session with the archive's credentials and TLS (e.g. for Orthanc's REST API)."""
    s = requests.Session()
    configure_session(s, access, name)
    return s
