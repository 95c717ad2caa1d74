"""Start-up of the ``sprim`` command (issue 13 item 3), fresh processes, same run.

- ``sprim --help``: wall and CPU time of the real entry point, next to ``python -c pass`` (the
  interpreter's own start) run alternately with it: target <= 0.3 s;
- ``sprim run DIR --out OUT --step reformat.mpr``: time from ``exec`` to the first open of an
  input file (an audit hook in a wrapper that runs the same entry point, ``tasks.main:main``,
  reports it and stops the process): target <= 0.5 s; the heavy libraries already imported
  at that moment are recorded;
- the start-up that remains is named by ``python -X importtime`` (largest top-level imports).

CPU time (user + system of the child) is reported beside wall time: on the shared 2-core
machine it is what an idle machine's wall time would be, roughly. Median of ``--runs``.
Writes ``bench/results/startup.json``. Run: ``.venv/bin/python -m bench.bench_startup [--runs 7]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import BIN, command_line, env, print_result, row, synthetic_series, write_result

HEAVY = ("celery", "kombu", "sqlalchemy", "vtkmodules", "scipy", "highdicom", "SimpleITK",
         "fastapi", "uvicorn", "jinja2", "prometheus_client", "pydicom", "numpy", "pydantic",
         "pydantic_settings", "PIL", "yaml", "requests")  # fmt: skip

#: The entry point with an audit hook: at the first open of a .dcm file under argv[1], print
#: the wall clock and CPU time so far and the heavy modules loaded, then stop.
FIRST_READ = r"""
import json, os, resource, sys, time
heavy, root, argv = json.loads(sys.argv[1])
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        if path.startswith(root) and path.endswith(".dcm"):
            r = resource.getrusage(resource.RUSAGE_SELF)
            print(json.dumps({"t": time.time(), "cpu": r.ru_utime + r.ru_stime,
                              "modules": sorted(h for h in heavy if h in sys.modules)}),
                  flush=True)
            os._exit(0)
sys.addaudithook(hook)
sys.argv = ["sprim", *argv]
from tasks.main import main
main()
"""


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) and stdout of one fresh process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = p.stdout.read() if p.stdout else b""
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"exit {os.waitstatus_to_exitcode(status)}: {' '.join(cmd)}")
    return wall, ru.ru_utime + ru.ru_stime, out.decode(errors="replace")


def _stat(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "runs": [round(x, 4) for x in xs]}  # fmt: skip


def help_vs_python(runs: int) -> dict[str, Any]:
    sprim = [str(BIN / "sprim"), "--help"]
    floor = [sys.executable, "-c", "pass"]
    out: dict[str, list[float]] = {"help": [], "help_cpu": [], "python": [], "python_cpu": []}
    for _ in range(runs + 1):  # the first pair warms the page cache
        w, c, _ = _run(floor)
        out["python"].append(w)
        out["python_cpu"].append(c)
        w, c, _ = _run(sprim)
        out["help"].append(w)
        out["help_cpu"].append(c)
    return {k: _stat(v[1:]) for k, v in out.items()}


def first_read(folder: Path, runs: int) -> dict[str, Any]:
    walls, cpus, modules = [], [], []
    with tempfile.TemporaryDirectory(prefix="sprim-bench-startup-") as tmp:
        argv = ["run", str(folder), "--out", str(Path(tmp) / "out"), "--step", "reformat.mpr"]
        payload = json.dumps([HEAVY, str(folder.resolve()), argv])
        for _ in range(runs + 1):
            t0 = time.time()
            _, _, out = _run([sys.executable, "-c", FIRST_READ, payload])
            got = json.loads(out.strip().splitlines()[-1])
            walls.append(got["t"] - t0)
            cpus.append(got["cpu"])
            modules = got["modules"]
    return {"wall": _stat(walls[1:]), "cpu": _stat(cpus[1:]), "modules": modules}


def importtime(code: str, top: int = 8) -> list[tuple[str, float]]:
    """The largest imports (cumulative ms) directly under ``code``'s own imports."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum, name = line.split("|")
        depth = (len(name) - len(name.lstrip())) // 2
        if depth <= 2:
            rows.append((name.strip(), int(cum) / 1000.0))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 runs (debugging).")
    args = ap.parse_args()
    runs = 3 if args.quick else args.runs
    cmd = command_line("bench.bench_startup")
    load0 = os.getloadavg()
    h = help_vs_python(runs)
    folder = synthetic_series(100)
    fr = first_read(folder, runs)
    it_help = importtime("import tasks.main")
    load1 = os.getloadavg()
    raw = {"runs": runs, "help": h, "first_read": fr, "importtime_tasks_cli_ms": it_help,
           "load_avg": [load0, load1]}  # fmt: skip
    load = f"load average {load0[0]:.1f} → {load1[0]:.1f} on 2 cores"
    hh, py = h["help"], h["python"]
    rows = [
        row("startup.help", "`sprim --help`, fresh process (wall)", hh["median"], "s",
            target=0.3, detail=f"min {hh['min']:.3f}, max {hh['max']:.3f}; CPU "
            f"{h['help_cpu']['median']:.3f} s; `python -c pass` alongside {py['median']:.3f} s "
            f"wall, {h['python_cpu']['median']:.3f} s CPU (`sprim --help` = "
            f"{hh['median'] / py['median']:.1f}x the bare interpreter, a ratio the load moves "
            f"less); {load}", command=cmd),
        row("startup.help_cpu", "`sprim --help` CPU time (user + system)",
            h["help_cpu"]["median"], "s", detail="what an idle machine's wall would be, roughly",
            command=cmd),
        row("startup.first_read", "`sprim run` exec → first input file opened (wall)",
            fr["wall"]["median"], "s", target=0.5,
            detail=f"min {fr['wall']['min']:.3f}, max {fr['wall']['max']:.3f}; CPU "
            f"{fr['cpu']['median']:.3f} s; imported by then: {', '.join(fr['modules'])}; "
            f"{load}", command=cmd),
        row("startup.first_read_cpu", "`sprim run` exec → first input file opened (CPU)",
            fr["cpu"]["median"], "s", detail="user + system of the process until the first "
            "open", command=cmd),
    ]  # fmt: skip
    print_result(write_result("startup", rows, raw, cmd))


if __name__ == "__main__":
    main()
