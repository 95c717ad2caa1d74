"""Archive credentials and TLS (issue 12 items 6-7), against real Orthanc processes.

- the minimal ``orthanc.json`` of docs/archive-loop.md, with authentication and HTTPS (a CA made
  here with ``openssl``): ``sprim watch`` routes, fetches and stores through it; a rule whose
  destination has a wrong password fails at once naming that archive; no secret in any log,
  record or output; ``watch -v`` stays quiet while idle;
- an unknown CA, a wrong or missing password: clear permanent errors, secrets never shown;
- DICOM TLS: C-STORE (``dicom+tls://``, client certificate) into Orthanc; ``sprim listen`` with
  TLS, fed by dcmtk ``storescu +tls``;
- rules' ``quiet_period`` under ``sprim watch``, and its first start (from now).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.harness.orthanc import OrthancServer, dcmtk_env, free_port, orthanc_available
from tests.platform_kit import write_study

ROOT = Path(__file__).resolve().parents[2]
SPRIM = str(Path(sys.executable).parent / "sprim")
SECRET = f"pw-{uuid.uuid4().hex}"  # the real password: must never show anywhere
WRONG = f"wrong-{uuid.uuid4().hex}"  # a wrong one: must not show either

pytestmark = pytest.mark.skipif(
    not orthanc_available() or not shutil.which("openssl") or not shutil.which("storescu"),
    reason="Orthanc + DICOMweb plugin, openssl and dcmtk needed (make sysdeps)",
)

TOUCH_RULES = """\
rules:
  - name: touch-back
    match: {Modality: CT}
    run: [{use: test.touch, with: {label: "SECURE BACK"}}]
"""


# -- a private PKI -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate (localhost, 127.0.0.1) and a client certificate signed by
    it, and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
            "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=sprim test {ca}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for leaf, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("client", "DNS:sprim")):
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{leaf}.key",
            "-out", f"{leaf}.csr", "-subj", f"/CN={leaf}")  # fmt: skip
        (d / f"{leaf}.ext").write_text(
            f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        ssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{leaf}.pem", "-days", "2", "-extfile", f"{leaf}.ext")  # fmt: skip
    return {p.stem: p for p in d.glob("*.pem")} | {p.name: p for p in d.glob("*.key")}


def _doc_orthanc_json() -> dict:
    text = (ROOT / "docs" / "archive-loop.md").read_text()
    return json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPRIM_")}
    env.update(
        SPRIM_HOME=str(home), PYTHONPATH=str(ROOT), SPRIM_PLUGINS="tests.platform_kit",
        TCP_NODELAY="1", **extra,
    )  # fmt: skip
    return env


def _until(pred, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


def _jobs(home: Path):
    from workers.platform.jobstore import JobStore

    store = JobStore(f"sqlite:///{home / 'jobs.db'}")
    try:
        return store.list()
    except Exception:  # noqa: BLE001  (schema not there yet)
        return []
    finally:
        store.dispose()


class _Proc:
    """A ``sprim`` command in the background, its output in a file; always stopped."""

    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.log = log
        fh = open(log, "w")  # noqa: SIM115  (kept by the child)
        self.p = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT)
        fh.close()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, marker: str, timeout: float = 60) -> None:
        ok = _until(lambda: marker in self.text() or self.p.poll() is not None, timeout)
        assert ok and marker in self.text(), self.text()[-3000:]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


def _files_containing(root: Path, *needles: str) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [f"{f}: {n[:8]}…" for n in needles if n.encode() in data]
    return hits


# -- the guide's orthanc.json, authentication + HTTPS, end to end ------------------------------
def test_guide_orthanc_json_with_auth_and_https_end_to_end_and_no_secret_anywhere(pki, tmp_path):
    cfg = _doc_orthanc_json()
    assert cfg["AuthenticationEnabled"] and not cfg.get("SslEnabled")
    assert cfg["DicomWeb"]["Enable"] and Path(cfg["Plugins"][0]).exists()
    cfg["RegisteredUsers"] = {"sprim": SECRET}
    home = tmp_path / "home"
    secret_file = tmp_path / "orthanc-password"
    secret_file.write_text(SECRET + "\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        TOUCH_RULES + "  - name: touch-out\n    match: {Modality: CT}\n"
        '    run: [{use: test.touch, with: {label: "SECURE OUT"}}]\n    destination: pacs-out\n'
    )
    with OrthancServer(
        tmp_path / "orthanc", config=cfg, ca_bundle=pki["ca"],
        tls_proxy=(pki["server"], pki["server.key"]),
    ) as orthanc:  # fmt: skip
        assert orthanc.url.startswith("https://")
        out_url = f"https://localhost:{orthanc.proxy_port}/dicom-web"  # same Orthanc, other name
        env = _env(
            home,
            SPRIM_RULES_FILE=str(rules),
            SPRIM_ARCHIVE_URL=orthanc.dicomweb_url,
            SPRIM_ARCHIVE_USERNAME="sprim",
            SPRIM_ARCHIVE_PASSWORD_FILE=str(secret_file),
            SPRIM_ARCHIVE_CA_BUNDLE=str(pki["ca"]),
            SPRIM_ARCHIVES=json.dumps({"pacs-out": out_url}),
            SPRIM_ARCHIVE_PACS_OUT_USERNAME="sprim",
            SPRIM_ARCHIVE_PACS_OUT_PASSWORD=WRONG,
            SPRIM_ARCHIVE_PACS_OUT_CA_BUNDLE=str(pki["ca"]),
        )
        watch = _Proc([SPRIM, "watch", "-v", "--interval", "1"], env, tmp_path / "watch.log")
        try:
            watch.wait_for("event=watch_started")
            study, _ = write_study(tmp_path / "study", n_slices=3)
            orthanc.storescu(tmp_path / "study")
            # StableAge of the guide (10 s), then both jobs
            done = _until(
                lambda: (
                    {j.rule: j for j in _jobs(home) if j.state in ("done", "failed")}
                    if len([j for j in _jobs(home) if j.state in ("done", "failed")]) == 2
                    else None
                ),
                90,
            )
            assert done, (watch.text()[-3000:], _jobs(home))
            back, out = done["touch-back"], done["touch-out"]
            assert back.state == "done", back.error
            derived = [
                s for s in orthanc.series_of_study(study)
                if s["MainDicomTags"].get("Manufacturer") == "sprim"
            ]  # fmt: skip
            assert [s["MainDicomTags"]["SeriesDescription"] for s in derived] == [
                "SECURE BACK [AXIAL 1mm]"
            ]
            assert len(derived[0]["Instances"]) == 3
            # a wrong password: failed at once (one attempt), naming the archive and variable
            assert out.state == "failed" and out.attempts == 1
            assert "pacs-out" in out.error and "HTTP 401" in out.error
            assert "refused sprim's credentials" in out.error
            assert "SPRIM_ARCHIVE_PACS_OUT_PASSWORD" in out.error

            # quiet logs: idle `watch -v` for 5 s adds no per-poll line
            mark = len(watch.text().splitlines())
            time.sleep(5)
            idle = watch.text().splitlines()[mark:]
            assert len(idle) <= 2, idle
        finally:
            watch.stop()
        text = watch.text()
        assert "Resetting dropped connection" not in text
        assert "alembic" not in text.lower()
        assert "Traceback" not in text

        # never a secret: logs, job store, watch state, work folders, command outputs
        outputs = [text]
        for args in (["config"], ["jobs", "list"], ["jobs", "show", str(out.id)]):
            r = subprocess.run([SPRIM, *args], env={**env, "COLUMNS": "250"},
                               capture_output=True, text=True, timeout=120)  # fmt: skip
            assert r.returncode == 0, r.stderr
            outputs.append(r.stdout + r.stderr)
        assert "<set>" in outputs[1] and "SPRIM_ARCHIVE_PACS_OUT_PASSWORD" in outputs[1]
        assert "pacs-out" in outputs[3]
        for o in outputs:
            assert SECRET not in o and WRONG not in o
        assert _files_containing(home, SECRET, WRONG) == []
        leaks = _files_containing(tmp_path, SECRET, WRONG)  # Orthanc's own config holds it
        assert sorted(leaks) == sorted(
            [f"{secret_file}: {SECRET[:8]}…", f"{orthanc.config_path}: {SECRET[:8]}…"]
        )


# -- clear, permanent errors; secrets never shown ---------------------------------------------
@pytest.fixture(scope="module")
def secure_orthanc(pki, tmp_path_factory):
    with OrthancServer(
        tmp_path_factory.mktemp("secure-orthanc"),
        users={"sprim": SECRET},
        tls_proxy=(pki["server"], pki["server.key"]),
        ca_bundle=pki["ca"],
    ) as o:
        yield o


def _archive(monkeypatch, url: str, **access: str):
    from workers.archives import open_archive
    from workers.core.config import settings

    for k in list(os.environ):
        if k.startswith("SPRIM_ARCHIVE"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("SPRIM_ARCHIVES", json.dumps({"pacs": url}))
    for k, v in access.items():
        monkeypatch.setenv(f"SPRIM_ARCHIVE_PACS_{k.upper()}", v)
    settings.cache_clear()
    try:
        return open_archive("pacs")
    finally:
        settings.cache_clear()


def test_unknown_ca_wrong_or_missing_password_are_clear_permanent_errors(
    secure_orthanc, pki, monkeypatch
):
    from workers.archives import ArchiveError

    url = secure_orthanc.dicomweb_url
    cases = {
        "unknown CA": (
            dict(username="sprim", password=SECRET, ca_bundle=str(pki["other-ca"])),
            ["pacs:", "the server's certificate is not trusted", "SPRIM_ARCHIVE_PACS_CA_BUNDLE"],
        ),
        "system CAs": (
            dict(username="sprim", password=SECRET),
            ["the server's certificate is not trusted", "SPRIM_ARCHIVE_PACS_CA_BUNDLE"],
        ),
        "wrong password": (
            dict(username="sprim", password=WRONG, ca_bundle=str(pki["ca"])),
            ["pacs:", "HTTP 401", "refused sprim's credentials", "SPRIM_ARCHIVE_PACS_PASSWORD"],
        ),
        "no credentials": (
            dict(ca_bundle=str(pki["ca"])),
            ["HTTP 401", "requires credentials, none are set", "SPRIM_ARCHIVE_PACS_USERNAME"],
        ),
    }
    for case, (access, words) in cases.items():
        archive = _archive(monkeypatch, url, **access)
        with pytest.raises(ArchiveError) as e:
            archive.series_of_study("1.2.3.4")
        text = f"{e.value} {e.value.reason} {archive!r} {archive.__dict__!r}"
        assert not e.value.transient, case
        for w in words:
            assert w in str(e.value), (case, w, str(e.value))
        assert SECRET not in text and WRONG not in text, case
    # right password and CA: the archive answers (an unknown study has no series)
    ok = _archive(monkeypatch, url, username="sprim", password=SECRET, ca_bundle=str(pki["ca"]))
    assert ok.series_of_study("1.2.3.4") == []
    # the password from a file, and from SPRIM_SECRETS_DIR
    secrets = pki["ca"].parent / "secrets"
    secrets.mkdir(exist_ok=True)
    (secrets / "sprim_archive_pacs_password").write_text(SECRET + "\n")
    monkeypatch.setenv("SPRIM_SECRETS_DIR", str(secrets))
    ok = _archive(monkeypatch, url, username="sprim", ca_bundle=str(pki["ca"]))
    assert ok.series_of_study("1.2.3.4") == []
    monkeypatch.delenv("SPRIM_SECRETS_DIR")
    (secrets / "pw").write_text(SECRET)
    ok = _archive(monkeypatch, url, username="sprim", password_file=str(secrets / "pw"),
                  ca_bundle=str(pki["ca"]))  # fmt: skip
    assert ok.series_of_study("1.2.3.4") == []
    (secrets / "pw").write_text(WRONG)  # rotated: read again at the next request
    with pytest.raises(ArchiveError, match="refused sprim's credentials"):
        ok.series_of_study("1.2.3.4")
    (secrets / "pw").write_text(SECRET)
    assert ok.series_of_study("1.2.3.4") == []
    # certificate not checked (tests only): works, and says so at every start
    ok = _archive(monkeypatch, url, username="sprim", password=SECRET, tls_verify="false")
    assert ok.series_of_study("1.2.3.4") == []
    # credentials in the URL are refused (they would show in logs and job records)
    with pytest.raises(ArchiveError, match="credentials in the archive URL") as e:
        _archive(monkeypatch, url.replace("https://", f"https://sprim:{SECRET}@"))
    assert SECRET not in str(e.value)


def test_client_certificate_for_an_archive_that_requires_one(pki, tmp_path, monkeypatch):
    from workers.archives import ArchiveError

    with OrthancServer(
        tmp_path / "orthanc", tls_proxy=(pki["server"], pki["server.key"], pki["ca"])
    ) as orthanc:  # the proxy asks for a client certificate signed by the CA
        url, ca = orthanc.dicomweb_url, str(pki["ca"])
        with pytest.raises(ArchiveError) as e:
            _archive(monkeypatch, url, ca_bundle=ca).series_of_study("1.2.3.4")
        assert not e.value.transient
        # TLS 1.3: the server's "certificate required" alert, or its close when the alert is lost
        why = str(e.value)
        assert "pacs:" in why and ("requires a client certificate" in why
                                   or "may require a client certificate" in why)  # fmt: skip
        assert "SPRIM_ARCHIVE_PACS_CLIENT_CERT" in str(e.value)
        archive = _archive(monkeypatch, url, ca_bundle=ca, client_cert=str(pki["client"]),
                           client_key=str(pki["client.key"]))  # fmt: skip
        assert archive.series_of_study("1.2.3.4") == []


def test_watch_names_an_untrusted_certificate(secure_orthanc, pki, tmp_path):
    env = _env(
        tmp_path / "home",
        SPRIM_ARCHIVE_URL=secure_orthanc.dicomweb_url,
        SPRIM_ARCHIVE_USERNAME="sprim",
        SPRIM_ARCHIVE_PASSWORD=SECRET,
        SPRIM_ARCHIVE_CA_BUNDLE=str(pki["other-ca"]),
    )
    r = subprocess.run([SPRIM, "watch", "--once"], env=env, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "the server's certificate is not trusted" in out and "Traceback" not in out
    assert SECRET not in out


def test_bearer_token_header_and_masked_repr(monkeypatch):
    import requests

    from workers.archives.access import configure_session
    from workers.core.config import archive_access, settings

    monkeypatch.setenv("SPRIM_ARCHIVES", json.dumps({"north": "https://north.invalid/dicom-web"}))
    monkeypatch.setenv("SPRIM_ARCHIVE_NORTH_TOKEN", SECRET)
    settings.cache_clear()
    access = archive_access("north")
    s = requests.Session()
    configure_session(s, access, "north")
    req = s.prepare_request(requests.Request("GET", "https://north.invalid/dicom-web/studies"))
    assert req.headers["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in repr(access) + repr(s.auth) + str(access.summary())
    monkeypatch.setenv("SPRIM_ARCHIVE_NORTH_USERNAME", "x")
    with pytest.raises(
        ValueError, match="SPRIM_ARCHIVE_NORTH_TOKEN and SPRIM_ARCHIVE_NORTH_USERNAME"
    ):
        archive_access("north")
    settings.cache_clear()


# -- DICOM TLS ----------------------------------------------------------------------------------
def test_c_store_over_dicom_tls_with_client_certificate(pki, tmp_path, monkeypatch):
    from workers.archives import ArchiveError, open_archive
    from workers.core.config import settings

    study, _ = write_study(tmp_path / "study", n_slices=3)
    files = sorted((tmp_path / "study").glob("*.dcm"))
    with OrthancServer(
        tmp_path / "orthanc", dicom_tls=(pki["server"], pki["server.key"], pki["ca"])
    ) as orthanc:
        spec = f"dicom+tls://{orthanc.aet}@localhost:{orthanc.dicom_port}"
        monkeypatch.setenv("SPRIM_ARCHIVES", json.dumps({"orthanc-tls": spec}))
        monkeypatch.setenv("SPRIM_ARCHIVE_ORTHANC_TLS_CLIENT_CERT", str(pki["client"]))
        monkeypatch.setenv("SPRIM_ARCHIVE_ORTHANC_TLS_CLIENT_KEY", str(pki["client.key"]))
        for ca, ok in ((pki["other-ca"], False), (pki["ca"], True)):
            monkeypatch.setenv("SPRIM_ARCHIVE_ORTHANC_TLS_CA_BUNDLE", str(ca))
            settings.cache_clear()
            archive = open_archive("orthanc-tls")
            assert archive.name == "orthanc-tls"
            if not ok:
                with pytest.raises(ArchiveError) as e:
                    archive.store(files)
                assert not e.value.transient
                assert "orthanc-tls: DICOM TLS: the server's certificate is not trusted" in str(
                    e.value
                )
                continue
            archive.store(files)
        settings.cache_clear()
        series = orthanc.series_of_study(study)
        assert [len(s["Instances"]) for s in series] == [3]
        # plain DICOM to the TLS port is not accepted
        from workers.archives.dimse import DimseArchive

        plain = DimseArchive(orthanc.aet, "127.0.0.1", orthanc.dicom_port, timeout=5)
        with pytest.raises(ArchiveError):
            plain.store(files[:1])


def _storescu_tls(port: int, files: list[Path], *tls: str) -> subprocess.CompletedProcess:
    args = ["storescu", "-aet", "MODALITY", "-aec", "SPRIM", "-to", "10", *tls,
            "127.0.0.1", str(port), *map(str, files)]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=60)


def test_listen_with_dicom_tls_from_dcmtk_storescu(pki, tmp_path):
    r = subprocess.run(["storescu", "--help"], capture_output=True, text=True)
    assert "+tls" in r.stdout, "dcmtk built without TLS"
    study, _ = write_study(tmp_path / "study", n_slices=3)
    files = sorted((tmp_path / "study").glob("*.dcm"))
    port = free_port()
    store = tmp_path / "incoming"
    listen = _Proc(
        [SPRIM, "listen", "--port", str(port), "--host", "127.0.0.1", "--store", str(store),
         "--quiet", "3600", "--tls-cert", str(pki["server"]), "--tls-key", str(pki["server.key"])],
        _env(tmp_path / "home"),
        tmp_path / "listen.log",
    )  # fmt: skip
    stalled = None
    try:
        listen.wait_for("event=listen_started")
        assert "tls=on" in listen.text()
        # a peer that connects and never says a word must not hold the others
        stalled = socket.create_connection(("127.0.0.1", port))
        r = _storescu_tls(port, files, "+tls", str(pki["client.key"]), str(pki["client"]),
                          "+cf", str(pki["ca"]))  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        stored = sorted(p.name for p in store.rglob("*.dcm"))
        assert len(stored) == 3
        # plain DICOM and an unknown server CA are refused; the listener goes on
        plain = subprocess.run(
            ["storescu", "-aet", "MODALITY", "-aec", "SPRIM", "-to", "10", "127.0.0.1",
             str(port), str(files[0])], capture_output=True, text=True, env=dcmtk_env(), timeout=60,
        )  # fmt: skip
        assert plain.returncode != 0
        other = _storescu_tls(port, files[:1], "+tla", "+cf", str(pki["other-ca"]))
        assert other.returncode != 0
        r = _storescu_tls(port, files[:1], "+tla", "+cf", str(pki["ca"]))  # anonymous client
        assert r.returncode == 0, r.stdout + r.stderr
        assert listen.p.poll() is None
    finally:
        if stalled is not None:
            stalled.close()
        listen.stop()
    assert "Traceback" not in listen.text()
    # one line per refused peer: plain DICOM, a client that does not trust our certificate
    assert "event=tls_handshake_failed reason=WRONG_VERSION_NUMBER" in listen.text()
    assert "event=tls_handshake_failed reason=TLSV1_ALERT_UNKNOWN_CA" in listen.text()


def test_listen_mutual_tls_requires_a_client_certificate(pki, tmp_path):
    from workers.core.tls import server_context
    from workers.ingest.listener import Listener, ListenerStore

    study, _ = write_study(tmp_path / "study", n_slices=2)
    files = sorted((tmp_path / "study").glob("*.dcm"))
    store = ListenerStore(tmp_path / "incoming", quiet_period=3600, fsync=False)
    ctx = server_context(pki["server"], pki["server.key"], client_ca=pki["ca"])
    with Listener(store, port=0, ssl_context=ctx) as listener:
        anonymous = _storescu_tls(listener.port, files, "+tla", "+cf", str(pki["ca"]))
        assert anonymous.returncode != 0
        assert store.received == 0
        r = _storescu_tls(listener.port, files, "+tls", str(pki["client.key"]),
                          str(pki["client"]), "+cf", str(pki["ca"]))  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert store.received == 2


# -- quiet_period under watch; first start ------------------------------------------------------
def test_watch_first_start_from_now_and_rule_quiet_period_counted_from_last_instance(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: at-once\n    match: {Modality: CT}\n"
        '    run: [{use: test.touch, with: {label: "AT ONCE"}}]\n'
        "  - name: after-8s\n    trigger: {on: study_stable, quiet_period: 8s}\n"
        "    match: {Modality: CT}\n"
        '    run: [{use: test.touch, with: {label: "AFTER 8S"}}]\n'
    )
    home = tmp_path / "home"
    with OrthancServer(tmp_path / "orthanc", stable_age=1) as orthanc:
        before, _ = write_study(tmp_path / "before", n_slices=2)
        orthanc.storescu(tmp_path / "before")
        assert _until(
            lambda: any(
                c["ChangeType"] == "StableStudy"
                for c in orthanc.get("/changes", params={"limit": 100}).json()["Changes"]
            ),
            20,
        )
        env = _env(home, SPRIM_RULES_FILE=str(rules), SPRIM_ARCHIVE_URL=orthanc.dicomweb_url)
        watch = _Proc([SPRIM, "watch", "--interval", "0.2"], env, tmp_path / "watch.log")
        try:
            watch.wait_for("event=watch_started")
            assert re.search(r"event=watch_first_start mode=from-now skipped_changes=\d+",
                             watch.text())  # fmt: skip
            study, _ = write_study(tmp_path / "study", n_slices=2)
            orthanc.storescu(tmp_path / "study")
            t_last = time.time()  # every instance acknowledged
            first = _until(lambda: [j for j in _jobs(home) if j.study_uid == study], 30)
            assert [j.rule for j in first] == ["at-once"], first
            assert first[0].created_at - t_last < 6
            both = _until(
                lambda: len(js := [j for j in _jobs(home) if j.study_uid == study]) == 2 and js,
                40,
            )
            assert both, watch.text()[-3000:]
            late = next(j for j in both if j.rule == "after-8s")
            # counted from the last instance (Orthanc's clock, 1 s resolution), not from
            # StableStudy: 8 s after it, not StableAge + 8 s
            assert 7.0 <= late.created_at - t_last < 11.5, late.created_at - t_last
            assert "event=route_scheduled" in watch.text()
            assert before not in {j.study_uid for j in _jobs(home)}  # from now: not replayed
        finally:
            watch.stop()
        # --from-start on a fresh home replays the feed: the earlier study is routed
        home2 = tmp_path / "home2"
        env2 = _env(home2, SPRIM_RULES_FILE=str(rules), SPRIM_ARCHIVE_URL=orthanc.dicomweb_url)
        watch = _Proc([SPRIM, "watch", "--interval", "0.2", "--from-start"], env2,
                      tmp_path / "watch2.log")  # fmt: skip
        try:
            watch.wait_for("event=watch_started")
            assert "mode=from-start replay_changes=" in watch.text()
            assert _until(lambda: before in {j.study_uid for j in _jobs(home2)}, 30)
        finally:
            watch.stop()


def test_job_store_migration_is_one_line_then_silent(tmp_path):
    """What a Celery worker prints at start (root logger at info): no Alembic set-up lines."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO, format='%(name)s %(message)s')\n"
        "from workers.platform.jobstore import JobStore\n"
        f"JobStore('sqlite:///{tmp_path / 'jobs.db'}').migrate()\n"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    first, second = (r.stdout + r.stderr for r in runs)
    assert first.strip().splitlines() == ["sprim.jobs event=job_store_migrated from=empty to=" +
                                          first.strip().rsplit("=", 1)[1]]  # fmt: skip
    assert second.strip() == ""


def test_orthanc_sends_to_listen_over_dicom_tls(pki, tmp_path):
    """Orthanc as the sender (``DicomModalities`` entry with ``UseDicomTls``), as the guide says."""
    from workers.core.tls import server_context
    from workers.ingest.listener import Listener, ListenerStore

    study, _ = write_study(tmp_path / "study", n_slices=2)
    store = ListenerStore(tmp_path / "incoming", quiet_period=3600, fsync=False)
    ctx = server_context(pki["server"], pki["server.key"], client_ca=pki["ca"])
    with Listener(store, port=0, ssl_context=ctx) as listener:
        with OrthancServer(
            tmp_path / "orthanc",
            dicom_tls=(pki["client"], pki["client.key"], pki["ca"]),
            extra={"DicomModalities": {"sprim": {"AET": "SPRIM", "Host": "127.0.0.1",
                                                 "Port": listener.port, "UseDicomTls": True}}},
        ) as orthanc:  # fmt: skip
            for f in sorted((tmp_path / "study").glob("*.dcm")):  # its DICOM port is TLS
                orthanc.session.post(f"{orthanc.url}/instances", data=f.read_bytes(),
                                     timeout=30).raise_for_status()  # fmt: skip
            sid = orthanc.get("/studies").json()[0]
            r = orthanc.session.post(f"{orthanc.url}/modalities/sprim/store", data=sid, timeout=60)
            assert r.ok, r.text
    assert store.received == 2
    assert {p.parent.parent.name for p in (tmp_path / "incoming").rglob("*.dcm")} == {study}
