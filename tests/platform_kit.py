"""Shared by the platform tests: a tiny synthetic CT, a fast test step, RabbitMQ/Postgres helpers.

Imported by worker processes through ``SPRIM_PLUGINS=tests.platform_kit`` (registers the
``test.touch`` step). The job path stays the real one: fetch -> read_series -> run_steps -> store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydantic import BaseModel, Field
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipelines import ImageSeries, StepError, Volume, step

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"


class TouchParams(BaseModel, frozen=True, extra="forbid"):
    sleep_s: float = Field(0.0, ge=0.0, description="Seconds to sleep (simulates work).")
    label: str = Field("TEST", description="Goes into the output description.")
    fail: bool = Field(False, description="Raise a StepError (deterministic failure).")
    crash: bool = Field(False, description="Raise a KeyError (a bug inside a step).")
    alloc_mb: int = Field(0, ge=0, description="Allocate and touch this many MB (memory tests).")


@step("test.touch", version="1.0.0", params=TouchParams, produces="series")
def touch(volume: Volume, params: TouchParams) -> ImageSeries:
    """Test step: sleep a little, return the input as a derived axial series."""
    if params.fail:
        raise StepError("refused on purpose (test)")
    if params.crash:
        raise KeyError("not-a-parameter")
    if params.alloc_mb:
        np.ones(params.alloc_mb * 2**20, dtype=np.uint8)
    if params.sleep_s:
        time.sleep(params.sleep_s)
    return ImageSeries(description=f"{params.label}", image=sitk.Image(volume.image), plane="axial")


def write_study(
    folder: Path,
    *,
    institution: str = "SITE A",
    modality: str = "CT",
    n_slices: int = 3,
    size: int = 8,
    series_description: str = "AXIAL 1mm",
    study_uid: str | None = None,
    slice_thickness: float = 1.0,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> tuple[str, str]:
    """Write a tiny CT series (one study) into ``folder``; returns (study UID, series UID)."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            study_uid,
            series_uid,
            frame,
        )
        ds.PatientName, ds.PatientID, ds.StudyID = "TEST^PLATFORM", "TP001", "1"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 2, k + 1
        ds.SeriesDescription, ds.InstitutionName = series_description, institution
        ds.BodyPartExamined = "CHEST"
        ds.ImageType = list(image_type)
        ds.Manufacturer = "TEST"
        ds.SliceThickness = slice_thickness
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(k) * slice_thickness]
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = (np.arange(size * size, dtype=np.int16).reshape(size, size) + k).tobytes()
        ds.save_as(folder / f"{series_uid}_{k:03d}.dcm", enforce_file_format=True)
    return study_uid, series_uid


# -- services ----------------------------------------------------------------------------------
def rabbit_ready() -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
        return True
    except OSError:
        return False


def _ctl(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def make_vhost() -> str:
    """A fresh RabbitMQ vhost (guest has all rights): parallel test runs never share messages."""
    vhost = f"sprim-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    r = _ctl("add_vhost", vhost)
    assert r.returncode == 0, r.stderr
    r = _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    assert r.returncode == 0, r.stderr
    return vhost


def drop_vhost(vhost: str) -> None:
    _ctl("delete_vhost", vhost)


def make_pg_db() -> str | None:
    """A throwaway PostgreSQL database; None when no server answers."""
    try:
        import psycopg

        name = f"sprim_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect("host=127.0.0.1 dbname=postgres user=root", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://root@127.0.0.1:5432/{name}"
    except Exception:
        return None


def drop_pg_db(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect("host=127.0.0.1 dbname=postgres user=root", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- chaos: a cuttable TCP proxy, a private RabbitMQ node ----------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpProxy:
    """127.0.0.1:<port> -> target. :meth:`cut` closes every connection and refuses new ones
    (the server is "down" for its clients); :meth:`restore` listens again on the same port."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: list = []
        self._server = None
        self.restore()

    def restore(self) -> None:
        import socket
        import threading

        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._server = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            if self._server is not srv:  # cut meanwhile
                client.close()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        import socket

        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        import socket

        srv, self._server = self._server, None
        if srv is not None:
            try:  # wakes the thread blocked in accept(); close() alone would not
                srv.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            srv.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    close = cut


class RabbitNode:
    """A private RabbitMQ node (never the machine's one on 5672): own node name, AMQP and
    distribution ports, data and log folders, no plugins (no management/prometheus listeners).
    It shares the machine's epmd (names are unique). :meth:`stop` / :meth:`start` keep its data:
    durable queues and persistent messages survive, as in a broker restart."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.port, self.dist_port = free_port(), free_port()
        self.name = f"sprim-chaos-{os.getpid()}-{uuid.uuid4().hex[:4]}@localhost"
        for d in ("mnesia", "log"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        # the machine's /etc/rabbitmq/rabbitmq.conf would put this node on 5672 too
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
        }
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, timeout: float = 120.0) -> RabbitNode:
        import socket

        exe = "/usr/lib/rabbitmq/bin/rabbitmq-server"
        log = open(self.base / "server.out", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([exe], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, (self.base / "server.out").read_text()[-2000:]
            assert time.monotonic() < deadline, "RabbitMQ node did not start"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.5)

    def stop(self) -> None:
        import signal

        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # Erlang: a clean shutdown
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    close = stop


def rabbit_server_available() -> bool:
    return Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()
