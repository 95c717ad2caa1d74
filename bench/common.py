"""Shared helpers of the benchmarks: timing, peak RSS of a fresh process, data, result files.

Every measured thing runs in its own child process, so peak RSS is per stage: the child's
``ru_maxrss`` comes back from :func:`os.wait4` (the kernel's figure for that process and the
children it waited for). Timings are the median of ``runs`` (>= 3 in a full run) with min and max.

Result files (``bench/results/<name>.json``) written by :func:`write_result` hold ``rows``: one
per reported figure, ``{"id", "what", "value", "unit", "target", "op", "detail", "command"}``;
``bench/report.py`` turns them into ``BENCHMARKS.md``. Other scripts may add such ``rows`` to
their own JSON to control how they are reported.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
REAL_CT = ROOT.parent / "shared" / "data" / "ct-abdomen-tcia" / "series"
#: Synthetic series are cached here between runs (seeded: same bytes every time).
DATA = Path(os.environ.get("SPRIM_BENCH_DATA", "/tmp/sprim-bench-data"))


@dataclass
class Sample:
    """One run of a child process."""

    seconds: float
    max_rss_mb: float
    stdout: str = ""
    inner: dict[str, Any] = field(default_factory=dict)  # JSON the child printed last
    cpu_s: float = 0.0  # user + system of the child (and its waited-for children)


@dataclass
class Stat:
    """Median, min and max of repeated runs, with the largest peak RSS seen."""

    median: float
    min: float
    max: float
    runs: list[float]
    max_rss_mb: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()} | {
            "runs": [round(x, 4) for x in self.runs]
        }

    def fmt(self) -> str:
        """``1.23 s (1.20–1.31), 400 MB``."""
        return f"{self.median:.3f} s ({self.min:.3f}–{self.max:.3f}), {self.max_rss_mb:.0f} MB"


def env(**extra: str) -> dict[str, str]:
    """The environment of children: Nagle off for dcmtk/Orthanc, repo on the path."""
    e = {**os.environ, "TCP_NODELAY": "1", **extra}
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH", "")]))
    return e


def run_cmd(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    environ: dict[str, str] | None = None,
    timeout: float = 900.0,
    check: bool = True,
) -> Sample:
    """Run ``cmd`` in a fresh process; wall time and that process's peak RSS (MB).

    The child is reaped with :func:`os.wait4`, whose rusage is the child's own (and that of the
    children it waited for), so each stage gets its own peak RSS.

    Raises
    ------
    RuntimeError
        ``check`` and a non-zero exit or a timeout (the message ends with the child's stderr).
    """
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(map(str, cmd)), cwd=cwd or ROOT, env=environ or env(), stdout=fo, stderr=fe
        )
        timer = threading.Timer(timeout, _stop, (proc,))
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if check and proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {shlex.join(map(str, cmd))}\n{err[-1500:]}")
    return Sample(seconds, usage.ru_maxrss / 1024.0, out, cpu_s=usage.ru_utime + usage.ru_stime)


def _stop(proc: subprocess.Popen, grace: float = 90.0) -> None:
    """Time limit: SIGTERM first (a bench script then stops the services it started), then kill."""
    proc.terminate()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return
        except ChildProcessError:
            return
        time.sleep(0.2)
    proc.kill()


def run_python(code: str, *args: str, timeout: float = 900.0) -> Sample:
    """Run Python ``code`` in a fresh interpreter; the last stdout line, if JSON, is ``inner``."""
    s = run_cmd([sys.executable, "-c", code, *args], timeout=timeout)
    lines = s.stdout.strip().splitlines()
    if lines:
        try:
            s.inner = json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    return s


def repeat(
    fn: Callable[[], Sample],
    runs: int,
    *,
    setup: Callable[[], None] | None = None,
    key: str | None = None,
) -> tuple[Stat, list[Sample]]:
    """Call ``fn`` ``runs`` times (``setup`` before each); ``key``: a time the child reported."""
    samples = []
    for _ in range(max(1, runs)):
        if setup:
            setup()
        samples.append(fn())
    times = [float(s.inner[key]) if key else s.seconds for s in samples]
    stat = Stat(
        statistics.median(times),
        min(times),
        max(times),
        times,
        max(s.max_rss_mb for s in samples),
    )
    return stat, samples


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM (from /proc), kernel, Python and the load average now."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = int(line.split()[1]) / 1024 / 1024
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(ram_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def row(
    id: str,
    what: str,
    value: float | None,
    unit: str,
    *,
    target: float | None = None,
    op: str = "<=",
    detail: str = "",
    command: str = "",
) -> dict[str, Any]:
    """One reported figure; ``value`` None means not measured (``detail`` says why)."""
    return {
        "id": id,
        "what": what,
        "value": None if value is None else round(float(value), 4),
        "unit": unit,
        "target": target,
        "op": op,
        "detail": detail,
        "command": command,
    }


def write_result(name: str, rows: list[dict], raw: dict[str, Any], command: str) -> Path:
    """Write ``bench/results/<name>.json``: rows, raw figures, machine, date, command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {
        "name": name,
        "date": now(),
        "command": command,
        "machine": machine(),
        "rows": rows,
        "raw": raw,
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def print_result(path: Path) -> None:
    """One console line per row of a written result file, then its path."""
    for r in json.loads(path.read_text())["rows"]:
        v = "n/a" if r["value"] is None else f"{r['value']:.3g} {r['unit']}"
        print(f"  {r['what']:<72} {v:>12}  {r['detail'][:120]}")
    print(f"-> {path}")


def synthetic_series(n_slices: int, seed: int = 0, size: int = 512) -> Path:
    """A cached synthetic CT folder of ``n_slices`` x ``size``² (bench.synthetic, seeded)."""
    folder = DATA / f"ct-{n_slices}x{size}-seed{seed}"
    done = folder / ".complete"
    if not done.exists():
        from bench.synthetic import write_synthetic_ct

        for f in folder.glob("*.dcm"):
            f.unlink()
        write_synthetic_ct(folder, n_slices=n_slices, size=size, seed=seed)
        done.write_text("ok\n")
    return folder


def series_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.dcm")) / 1e6


def cat_floor(folder: Path, runs: int) -> Stat:
    """``cat`` every file of ``folder`` to /dev/null (warm cache): the read floor."""
    cmd = ["sh", "-c", f"cat {shlex.quote(str(folder))}/*.dcm > /dev/null"]
    run_cmd(cmd)  # warm the page cache
    return repeat(lambda: run_cmd(cmd), runs)[0]


def command_line(module: str) -> str:
    """How to reproduce: ``.venv/bin/python -m MODULE ARGS`` of this process."""
    return shlex.join([".venv/bin/python", "-m", module, *sys.argv[1:]])


# -- a private platform: Orthanc + RabbitMQ vhost + 2 worker processes + sprim watch ------
def rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=120)


def study_uid_of(folder: Path) -> str:
    import pydicom

    f = next(iter(sorted(folder.glob("*.dcm"))))
    return str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)


class Platform:
    """Orthanc, a RabbitMQ vhost, ``celery -A tasks worker -c 2`` and ``sprim watch``, private.

    Built-in rules, SQLite job store in ``root/home``, Orthanc StableAge ``stable_age`` s. The
    worker's processes are sampled for peak RSS (VmHWM) in :attr:`peak_rss`.
    """

    def __init__(self, root: Path, stable_age: int = 2) -> None:
        from tests.harness.orthanc import OrthancServer

        self.root = root
        self.vhost = f"sprim-bench-{os.getpid()}"
        self.orthanc = OrthancServer(root / "orthanc", stable_age=stable_age)
        self.home = root / "home"
        self.worker: subprocess.Popen | None = None
        self.watcher: subprocess.Popen | None = None
        self.peak_rss: dict[int, float] = {}
        self._stop = threading.Event()
        self.since = 0

    def __enter__(self) -> Platform:
        rabbitmqctl("add_vhost", self.vhost)
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        self.orthanc.start()
        self.env = env(
            SPRIM_HOME=str(self.home),
            SPRIM_BROKER_URL=f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}",
            SPRIM_ARCHIVE_URL=self.orthanc.dicomweb_url,
            SPRIM_WATCH_URL=self.orthanc.url,
            SPRIM_DISPATCH_WINDOW="2",  # = the 2 worker slots (the default, made explicit)
        )  # everything else at its default: watch polls every 1 s
        log = open(self.root / "worker.log", "ab")  # noqa: SIM115
        self.worker = subprocess.Popen(
            [str(BIN / "celery"), "-A", "tasks", "worker", "-c", "2", "-l", "info",
             "-n", f"{self.vhost}@%h", "--without-gossip", "--without-mingle"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while b"ready." not in (self.root / "worker.log").read_bytes():
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("celery worker did not start: see " + str(self.root))
            time.sleep(0.2)
        threading.Thread(target=self._watch_rss, daemon=True).start()
        from workers.platform.jobstore import default_url, open_store

        self.store = open_store(default_url(self.home))
        self.since = self.orthanc.get("/changes", params={"last": ""}).json().get("Last", 0)
        self.start_watch()
        return self

    def _watch_rss(self) -> None:
        """Peak RSS (VmHWM) of every process of the worker, sampled every 0.2 s."""
        while not self._stop.wait(0.2) and self.worker:
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    stat = (d / "stat").read_text()
                    ppid = int(stat.rsplit(")", 1)[1].split()[1])
                    if ppid != self.worker.pid and int(d.name) != self.worker.pid:
                        continue
                    for line in (d / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            mb = int(line.split()[1]) / 1024
                            self.peak_rss[int(d.name)] = max(self.peak_rss.get(int(d.name), 0), mb)
                except (OSError, ValueError, IndexError):
                    continue

    def start_watch(self) -> None:
        log = open(self.root / "watch.log", "ab")  # noqa: SIM115
        self.watcher = subprocess.Popen(
            [str(BIN / "sprim"), "watch", "--from-start"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop_watch(self) -> None:
        if self.watcher and self.watcher.poll() is None:
            self.watcher.terminate()
            self.watcher.wait(30)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.stop_watch()
        if self.worker and self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(30)  # warm shutdown: running jobs may finish
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, 9)  # the worker's own group: main + pool processes
                self.worker.wait()
        self.orthanc.close()
        try:
            rabbitmqctl("delete_vhost", self.vhost)
        except subprocess.CalledProcessError:
            pass

    # -- observations ------------------------------------------------------------------------
    def wait_stable(self, study_uids: set[str], timeout: float = 600.0) -> dict[str, float]:
        """Epoch seconds at which each study's ``StableStudy`` appeared in Orthanc's feed."""
        ids: dict[str, str] = {}
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < len(study_uids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(study_uids) - len(seen)} studies never became stable")
            for uid in study_uids - set(ids.values()):
                hits = requests.post(self.orthanc.url + "/tools/lookup", data=uid, timeout=10)
                for h in hits.json():
                    if h["Type"] == "Study":
                        ids[h["ID"]] = uid
            while True:  # Orthanc returns at most 100 changes a call: read to the end
                feed = self.orthanc.get("/changes", params={"since": self.since, "limit": 100})
                feed = feed.json()
                stamp = time.time()
                for ch in feed.get("Changes", []):
                    if ch["ChangeType"] == "StableStudy" and ch["ID"] in ids:
                        seen.setdefault(ids[ch["ID"]], stamp)
                    self.since = max(self.since, ch["Seq"])
                if feed.get("Done", True) or not feed.get("Changes"):
                    break
            time.sleep(0.05)
        return seen

    def wait_done(self, study_uids: set[str], timeout: float = 900.0) -> list:
        """All jobs of the studies once each study has jobs and all are final."""
        final = {"done", "failed", "cancelled", "no_match"}
        deadline = time.monotonic() + timeout
        while True:
            jobs = [j for uid in study_uids for j in self.store.list(study_uid=uid, limit=50)]
            have = {j.study_uid for j in jobs}
            if have >= study_uids and all(j.state in final for j in jobs):
                return jobs
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs not final after {timeout:.0f} s: {len(jobs)} jobs")
            time.sleep(0.05 if len(study_uids) <= 3 else 0.5)  # finished_at is the clock


def storescu(orthanc: Any, folders: list[Path]) -> float:
    """Send folders to Orthanc with dcmtk ``storescu`` (one association); seconds taken."""
    args = ["storescu", "-aet", "BENCH", "-aec", orthanc.aet, "-nh", "+sd", "+r", "127.0.0.1",
            str(orthanc.dicom_port), *map(str, folders)]  # fmt: skip
    return run_cmd(args, timeout=1800).seconds
