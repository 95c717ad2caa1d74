"""``python -m bench [--quick] [--only NAME ...]``: run the benchmarks, regenerate BENCHMARKS.md.

Each benchmark script ``bench/bench_<name>.py`` runs as its own process (its stages spawn their
own processes too, so peak RSS is per stage) and writes ``bench/results/*.json``; a script that
is missing or fails is recorded, never hidden. ``BENCHMARKS.md`` is then regenerated from every
result file present (rows from older runs show their own date). Synthetic series are cached in
``SPRIM_BENCH_DATA`` (default ``/tmp/sprim-bench-data``).

``--quick`` passes ``--quick`` to scripts that take it (else ``--runs 1`` / ``--slices 100``
when they take those): small series, one run, for debugging — not for the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, now, run_cmd
from bench.report import RUN_FILE, write_report

#: Run order: cheap, service-free first; the platform (Orthanc + RabbitMQ) last.
ORDER = ("read", "startup", "mpr", "3d", "memory", "platform", "archive", "peers", "e2e", "hosts")
#: Wall-clock limit per script (full run; the whole of ``make bench`` must stay <= 15 min).
LIMIT_S = {"e2e": 900.0, "peers": 400.0, "archive": 400.0, "hosts": 600.0, "memory": 400.0}
DEFAULT_LIMIT_S = 240.0


def available() -> list[str]:
    """Benchmark names, from ``bench/bench_*.py``, in run order."""
    found = {p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


#: What a script leaves to another one of the same run: (script, other) -> arguments. Applied
#: when the other runs later in this run, or ran earlier and succeeded.
DEFER = {
    ("peers", "archive"): ["--skip", "receive"],  # listen vs storescp: bench_archive measures it
    ("e2e", "archive"): ["--skip", "fetch"],  # WADO-RS vs zip download: bench_archive too
    ("e2e", "3d"): ["--skip", "stages"],  # segmentation, SEG, mesh, MIP: bench_3d measures them
    ("archive", "e2e"): ["--skip", "loop"],  # last instance -> outputs stored: bench_e2e too
}


def script_args(
    name: str, quick: bool, names: list[str] | None = None, ran: dict[str, dict] | None = None
) -> list[str]:
    """Arguments for one script: quick-mode flags it understands, skips of duplicate work."""
    ran = ran or {}

    def covered(other: str) -> bool:
        return ran[other]["status"] == "ok" if other in ran else other in (names or [])

    skips = [a for (n, other), extra in DEFER.items() if n == name and covered(other)
             for a in extra[1:]]  # fmt: skip
    args = ["--skip", *skips] if skips else []
    if not quick:
        return args
    src = (ROOT / "bench" / f"bench_{name}.py").read_text()
    if re.search(r"[\"']--quick[\"']", src):
        return ["--quick", *args]
    if re.search(r"[\"']--runs[\"']", src):
        args += ["--runs", "1"]
    if re.search(r"[\"']--slices[\"']", src):
        args += ["--slices", "100"]
    return args


def _written_by(path: Path, name: str) -> bool:
    """Whether result ``path`` comes from ``bench_<name>`` (others may run scripts meanwhile)."""
    if path.stem == name:
        return True
    try:
        return f"bench_{name}" in str(json.loads(path.read_text()).get("command", ""))
    except (OSError, json.JSONDecodeError):
        return False


def run_one(name: str, quick: bool, names: list[str], ran: dict[str, dict]) -> dict:
    """Run ``bench_<name>``; status, seconds, the result files it wrote, a note on failure."""
    before = {p.name: p.stat().st_mtime for p in RESULTS.glob("*.json")}
    cmd = [sys.executable, "-m", f"bench.bench_{name}", *script_args(name, quick, names, ran)]
    limit = LIMIT_S.get(name, DEFAULT_LIMIT_S) * (2 if quick else 1)
    t0 = time.perf_counter()
    print(f"== bench_{name}: {' '.join(cmd[1:])}", flush=True)
    try:
        s = run_cmd(cmd, timeout=limit)
        status, note = "ok", ""
        print(s.stdout.rstrip(), flush=True)
    except RuntimeError as e:
        status, note = "failed", str(e).strip().splitlines()[-1][:400]
        print(f"   FAILED: {e}", flush=True)
    wrote = [p.stem for p in RESULTS.glob("*.json") if p.stem != RUN_FILE and p.stat().st_mtime !=
             before.get(p.name) and _written_by(p, name)]  # fmt: skip
    if status == "ok" and not wrote:
        status, note = "no result", "exited 0 but wrote no bench/results/*.json"
    return {
        "status": status,
        "seconds": round(time.perf_counter() - t0, 1),
        "results": wrote,
        "command": " ".join([".venv/bin/python", *cmd[1:]]),
        "note": note,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Small sizes, one run (debugging).")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="Run only these benchmarks.")
    ap.add_argument("--list", action="store_true", help="List the benchmarks and exit.")
    ap.add_argument("--report-only", action="store_true", help="Only regenerate BENCHMARKS.md.")
    args = ap.parse_args()
    names = available()
    if args.list:
        print("\n".join(names))
        return
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in args.only]
    RESULTS.mkdir(parents=True, exist_ok=True)
    run_path = RESULTS / f"{RUN_FILE}.json"
    previous = json.loads(run_path.read_text()) if run_path.exists() else {}
    if not args.report_only:
        os.environ.setdefault("TCP_NODELAY", "1")
        t0 = time.perf_counter()
        run = {
            "date": now(),
            "mode": "quick" if args.quick else "full",
            "only": args.only or [],
            "machine": machine(),
            "load_start": [round(x, 2) for x in os.getloadavg()],
            "scripts": dict(previous.get("scripts") or {}) if args.only else {},
            "produced_by": dict(previous.get("produced_by") or {}),
        }
        for n in [x for x in ORDER if x not in names and x not in available()]:
            run["scripts"].setdefault(n, {"status": "missing", "note": f"no bench/bench_{n}.py"})
        this_run: dict[str, dict] = {}
        for name in names:
            res = this_run[name] = run_one(name, args.quick, names, this_run)
            run["scripts"][name] = res
            for r in res["results"]:
                run["produced_by"][r] = f"bench_{name}"
        run["load_end"] = [round(x, 2) for x in os.getloadavg()]
        run["seconds"] = round(time.perf_counter() - t0, 1)
        run_path.write_text(json.dumps(run, indent=2) + "\n")
    out = write_report()
    print(f"-> {Path(out).relative_to(ROOT)}")
    failed = [n for n in names if (json.loads(run_path.read_text())["scripts"].get(n) or {})
              .get("status") not in ("ok",)]  # fmt: skip
    if failed and not args.report_only:
        print(f"benchmarks not ok: {', '.join(failed)} (see BENCHMARKS.md)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
