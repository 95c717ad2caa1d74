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
    """The environment of children: Nagle off for dcmtk/Orthanc (DESIGN §6), repo on the path."""
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
        timer = threading.Timer(timeout, proc.kill)
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
    return Sample(seconds, usage.ru_maxrss / 1024.0, out)


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
    """Call ``fn`` ``runs`` times (``setup`` before each); ``key`` picks a time the child reported."""
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
