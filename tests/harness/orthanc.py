"""A private Orthanc for tests and benchmarks: own ports, own storage, DICOMweb on.

Never relies on a system service. The instance can be stopped and started again on the same
ports and storage (an archive outage), and is always stopped by :meth:`OrthancServer.close`.

Example
-------
>>> with OrthancServer(tmp_path) as orthanc:          # doctest: +SKIP
...     requests.get(orthanc.url + "/system").json()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

ORTHANC_BIN = os.environ.get("SPRIM_TEST_ORTHANC", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_available() -> bool:
    """True when the Orthanc binary and its DICOMweb plugin are installed."""
    return os.access(ORTHANC_BIN, os.X_OK) and Path(DICOMWEB_PLUGIN).exists()


def dcmtk_env() -> dict[str, str]:
    """The environment for dcmtk tools and Orthanc: Nagle off."""
    return {**os.environ, "TCP_NODELAY": "1"}


class OrthancServer:
    """One Orthanc process with a generated configuration in ``root``.

    Parameters
    ----------
    root : Path
        Folder for config, storage, index and log (created).
    aet : str
        Orthanc's own AE title.
    stable_age : int
        Seconds without new instances before a series/study is stable (Orthanc's ``StableAge``).
    modalities : Mapping[str, tuple[str, str, int]]
        Peers Orthanc may send to (``DicomModalities``): name -> (AET, host, port).
    in_memory : bool
        Storage and index in a fresh folder under ``/dev/shm`` (removed by :meth:`close`; kept
        across stop/start). Tests on a machine shared by several engineers are otherwise bound
        by everyone's fsyncs; benchmarks keep the disk (``in_memory=False``).
    sync_storage : bool
        Orthanc's ``SyncStorageArea`` (fsync of every stored file). Off by default here: tests
        on a shared disk run 2x faster; benchmarks turn it on (the production default).
    reject_description : str, optional
        Install a ``ReceivedInstanceFilter`` (Lua) dropping instances whose SeriesDescription is
        this: an archive that refuses (or silently drops) what it is sent.
    extra : Mapping
        Further configuration keys, merged last.
    users : Mapping[str, str], optional
        ``AuthenticationEnabled`` with these ``RegisteredUsers``; :attr:`session` logs in as the
        first one.
    ssl_certificate : Path, optional
        HTTPS (``SslEnabled``): PEM with the server certificate and its key (Orthanc's
        ``SslCertificate``); :attr:`url` is then ``https://``. Debian 12's Orthanc 1.10.1
        crashes (SIGSEGV in a civetweb worker) at its first HTTPS connection: use ``tls_proxy``.
    tls_proxy : tuple of Path, optional
        HTTPS by a TLS-terminating proxy in front of Orthanc (``socat``, as nginx or stunnel
        would be in production): (certificate, key[, client CA]); :attr:`url` is then the
        proxy's ``https://`` address. With a client CA, clients must show a certificate it
        signed (mutual TLS).
    ca_bundle : Path, optional
        The CA :attr:`session` trusts for that certificate.
    dicom_tls : tuple of Path, optional
        DICOM TLS on the DICOM port: (certificate, key, trusted client CAs); clients must
        present a certificate signed by one of them.
    config : Mapping, optional
        A complete configuration used as it is (e.g. the one in docs/archive-loop.md): only
        its ports, storage and index folders are replaced by this instance's.
    """

    def __init__(
        self,
        root: Path,
        *,
        aet: str = "ORTHANC",
        stable_age: int = 1,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        in_memory: bool = True,
        sync_storage: bool = False,
        reject_description: str | None = None,
        extra: Mapping | None = None,
        users: Mapping[str, str] | None = None,
        ssl_certificate: Path | None = None,
        ca_bundle: Path | None = None,
        dicom_tls: tuple[Path, Path, Path] | None = None,
        config: Mapping | None = None,
        tls_proxy: tuple[Path, ...] | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.tls_proxy = tls_proxy
        self.proxy_port = free_port() if tls_proxy else None
        self._proxy: subprocess.Popen | None = None
        self._shm: Path | None = None
        data = self.root
        if in_memory and Path("/dev/shm").is_dir():
            self._shm = data = Path(tempfile.mkdtemp(prefix="sprim-orthanc-", dir="/dev/shm"))
        self.config = {
            "Name": f"sprim-test-{self.http_port}",
            "StorageDirectory": str(data / "storage"),
            "IndexDirectory": str(data / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "HttpDescribeErrors": True,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "StableAge": stable_age,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "OverwriteInstances": True,
            "StorageCompression": False,
            "SyncStorageArea": sync_storage,
            "SaveJobs": False,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": False,
                "Ssl": False,
                "StudiesMetadata": "MainDicomTags",
                "SeriesMetadata": "Full",
            },
        }
        if reject_description:
            lua = self.root / "filter.lua"
            lua.write_text(
                "function ReceivedInstanceFilter(dicom, origin, info)\n"
                f"  if dicom.SeriesDescription == {json.dumps(reject_description)} then\n"
                "    return false\n  end\n  return true\nend\n"
            )
            self.config["LuaScripts"] = [str(lua)]
        if users:
            self.config.update(AuthenticationEnabled=True, RegisteredUsers=dict(users))
        if ssl_certificate:
            self.config.update(SslEnabled=True, SslCertificate=str(ssl_certificate))
        if dicom_tls:
            cert, key, trusted = dicom_tls
            self.config.update(
                DicomTlsEnabled=True, DicomTlsCertificate=str(cert), DicomTlsPrivateKey=str(key),
                DicomTlsTrustedCertificates=str(trusted), DicomTlsRemoteCertificateRequired=True,
            )  # fmt: skip
        if extra:
            self.config.update(extra)
        if config is not None:
            self.config = json.loads(json.dumps(config))
            self.config.update(
                HttpPort=self.http_port, DicomPort=self.dicom_port,
                StorageDirectory=str(data / "storage"), IndexDirectory=str(data / "index"),
            )  # fmt: skip
            self.aet = self.config.get("DicomAet", "ORTHANC")
        #: requests as an authorised client of this Orthanc (its first user, its CA)
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would replace ca_bundle
        registered = self.config.get("RegisteredUsers") or {}
        if self.config.get("AuthenticationEnabled") and registered:
            self.session.auth = next(iter(registered.items()))
        if ca_bundle:
            self.session.verify = str(ca_bundle)
        self.config_path = self.root / "orthanc.json"
        self.log_path = self.root / "orthanc.log"

    # -- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """REST root, e.g. ``http://127.0.0.1:8042`` (``https://`` with SSL on)."""
        if self.proxy_port:
            return f"https://127.0.0.1:{self.proxy_port}"
        scheme = "https" if self.config.get("SslEnabled") else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``."""
        return f"{self.url}/dicom-web"

    # -- life cycle ------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> OrthancServer:
        """Start Orthanc (same ports and storage as before) and wait until ``/system`` answers."""
        if self.proc and self.proc.poll() is None:
            return self
        self.config_path.write_text(json.dumps(self.config, indent=2))
        log = open(self.log_path, "ab")  # noqa: SIM115  (kept open by the child)
        self.proc = subprocess.Popen(
            [ORTHANC_BIN, str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dcmtk_env(),
            cwd=self.root,
        )
        log.close()
        if self.tls_proxy:
            cert, key, *client_ca = self.tls_proxy
            verify = f"verify=1,cafile={client_ca[0]}" if client_ca else "verify=0"
            self._proxy = subprocess.Popen(
                ["socat", f"OPENSSL-LISTEN:{self.proxy_port},bind=127.0.0.1,reuseaddr,fork,"
                 f"cert={cert},key={key},{verify}", f"TCP:127.0.0.1:{self.http_port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        # Orthanc itself (the proxy may want a client certificate), then the proxy's port
        probe = f"http://127.0.0.1:{self.http_port}" if self.tls_proxy else self.url
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.session.get(probe + "/system", timeout=1).ok and self._proxy_up():
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer in {timeout}s: {self.log_tail()}")

    def _proxy_up(self) -> bool:
        if not self.proxy_port:
            return True
        try:
            socket.create_connection(("127.0.0.1", self.proxy_port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Orthanc (terminate, wait; kill if it hangs). Storage and ports are kept."""
        if self._proxy is not None:
            try:  # socat forks per connection: its whole process group
                os.killpg(self._proxy.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self._proxy.wait(timeout)
            self._proxy = None
        if not self.proc:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def restart(self) -> OrthancServer:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return bool(self.proc and self.proc.poll() is None)

    def close(self) -> None:
        """Stop Orthanc and remove its in-memory storage."""
        self.stop()
        if self._shm is not None:
            shutil.rmtree(self._shm, ignore_errors=True)
            self._shm = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- conveniences for tests ------------------------------------------------------------
    def get(self, path: str, **kw) -> requests.Response:
        r = self.session.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r

    def reset(self) -> None:
        """Delete every patient (a clean archive between tests, without a restart)."""
        for pid in self.get("/patients").json():
            self.session.delete(f"{self.url}/patients/{pid}", timeout=30).raise_for_status()

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Orthanc's series resources of a study (empty when the study is unknown)."""
        r = self.session.post(
            self.url + "/tools/lookup", data=study_uid, timeout=30
        )  # lookup by any UID
        r.raise_for_status()
        for hit in r.json():
            if hit["Type"] == "Study":
                return self.get(f"/studies/{hit['ID']}/series").json()
        return []

    def storescu(self, files: Sequence[Path] | Path, *, calling: str = "STORESCU") -> None:
        """Send files (or a folder) to this Orthanc with dcmtk ``storescu``."""
        send(files, "127.0.0.1", self.dicom_port, called=self.aet, calling=calling)


def send(
    files: Sequence[Path] | Path,
    host: str,
    port: int,
    *,
    called: str,
    calling: str = "STORESCU",
    check: bool = True,
) -> subprocess.CompletedProcess:
    """dcmtk ``storescu`` of files or a folder (recursively), Nagle off."""
    exe = shutil.which("storescu") or "/usr/bin/storescu"
    args = [exe, "-aet", calling, "-aec", called, "-nh"]
    if isinstance(files, Path) and files.is_dir():
        args += ["+sd", "+r", host, str(port), str(files)]
    else:
        args += [host, str(port), *[str(f) for f in files]]
    r = subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=300)
    if check and r.returncode != 0:
        raise RuntimeError(f"storescu failed ({r.returncode}): {r.stderr[-2000:]}")
    return r
