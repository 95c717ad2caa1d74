"""End to end: the default CT rule through Orthanc and RabbitMQ, throughput, cost vs slices.

1. **Cost vs slice count** (no services): a fresh process per run reads a synthetic 512² CT of
   100/200/400/800 slices and runs the built-in rules' steps on it (what ``sprim run`` does),
   writing DICOM; a least-squares line gives the cost per slice and R² (linear growth).
2. **Platform**: a private Orthanc (DICOMweb, StableAge 2 s), a private RabbitMQ vhost,
   ``celery -A tasks worker -c 2`` (two worker processes) and ``sprim watch`` (built-in rules). Latency: a 400-slice CT is sent with ``storescu``; the clock starts when
   Orthanc publishes ``StableStudy`` and stops when every job of the study is ``done`` (outputs
   confirmed stored in Orthanc). Throughput: a stream of studies is loaded while the watcher is
   stopped, then the watcher starts and studies/hour is measured from its start to the last
   job done. WADO-RS fetch vs ``curl`` of the same WADO-RS URL and vs Orthanc's zip archive.

Writes ``bench/results/e2e.json``.

Run: ``.venv/bin/python -m bench.bench_e2e [--quick] [--runs 3] [--skip cost platform]``
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from bench.common import (
    command_line,
    repeat,
    row,
    run_python,
    synthetic_series,
    write_result,
)

COST = """
import json, sys, tempfile, time
from pathlib import Path
t0 = time.perf_counter()
from workers.run import plan_rules
from workers.runner import run_steps
from workers.series import read_series, scan
imports = time.perf_counter() - t0
t = {}
t0 = time.perf_counter()
found = scan(Path(sys.argv[1]))
t["scan"] = time.perf_counter() - t0
jobs, _ = plan_rules(None)(found)
t["route"] = time.perf_counter() - t0 - t["scan"]
out = {"imports_s": imports, "jobs": len(jobs), "rules": sorted({j.rule for j in jobs})}
with tempfile.TemporaryDirectory(prefix="sprim-bench-cost-") as tmp:
    for j in jobs:
        t1 = time.perf_counter()
        src = read_series(j.series)
        t["read"] = t.get("read", 0.0) + time.perf_counter() - t1
        rep = run_steps(src, j.calls, j.rule, Path(tmp) / j.rule)
        for s in rep.steps:
            t[s.name] = t.get(s.name, 0.0) + s.seconds
        out["objects"] = out.get("objects", 0) + len(rep.written)
t["total"] = time.perf_counter() - t0
out["stages"] = t
print(json.dumps(out))
"""


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line ``y = slope * x + intercept`` and its R²."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx if sxx else 0.0
    icpt = my - slope * mx
    ss_res = sum((y - (slope * x + icpt)) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"slope": slope, "intercept": icpt, "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0}


def cost_vs_slices(sizes: list[int], runs: int) -> dict[str, Any]:
    """Read + default-rule steps + DICOM write per slice count, each run a fresh process."""
    points = []
    for n in sizes:
        folder = synthetic_series(n)
        _, samples = repeat(lambda f=folder: run_python(COST, str(f)), runs)
        totals = [s.inner["stages"]["total"] for s in samples]
        med = samples[totals.index(statistics.median_low(totals))].inner
        volume_mb = n * 512 * 512 * 2 / 2**20
        points.append(
            {
                "slices": n,
                "total_s": {
                    "median": statistics.median(totals),
                    "min": min(totals),
                    "max": max(totals),
                    "runs": totals,
                },
                "stages_s": {k: round(v, 4) for k, v in med["stages"].items()},
                "rules": med["rules"],
                "objects": med.get("objects", 0),
                "max_rss_mb": round(max(s.max_rss_mb for s in samples), 1),
                "volume_int16_mb": round(volume_mb, 1),
                "rss_to_volume": round(max(s.max_rss_mb for s in samples) / volume_mb, 2),
            }
        )
    xs = [float(p["slices"]) for p in points]
    line = fit(xs, [p["total_s"]["median"] for p in points]) if len(points) > 1 else {}
    return {"points": points, "fit_total": line}


def _cost_rows(cost: dict[str, Any], cmd: str) -> list[dict]:
    rows = []
    pts = cost.get("points", [])
    if not pts:
        return rows
    line = cost.get("fit_total") or {}
    if line:
        per100 = line["slope"] * 100
        rows.append(row("e2e.cost_slope", "cost vs slice count: read + default rule + write",
                        line["slope"] * 1000, "ms/slice",
                        detail=f"{per100:.2f} s per 100 slices, intercept {line['intercept']:.2f} s, "
                        f"R² {line['r2']:.3f} over {', '.join(str(p['slices']) for p in pts)} "
                        "slices (" + ", ".join(f"{p['total_s']['median']:.2f} s" for p in pts)
                        + ")", command=cmd))  # fmt: skip
        rows.append(row("e2e.cost_r2", "cost vs slice count: linearity (R² of the fit)",
                        line["r2"], "", target=0.98, op=">=", command=cmd))  # fmt: skip
    for p in pts:
        st = ", ".join(f"{k} {v:.2f}" for k, v in p["stages_s"].items() if k != "total")
        rows.append(row(f"e2e.cost.{p['slices']}", f"read + default rule + write, {p['slices']} "
                        f"slices (rules: {', '.join(p['rules']) or 'none'})",
                        p["total_s"]["median"], "s", detail=f"min {p['total_s']['min']:.2f}, "
                        f"max {p['total_s']['max']:.2f}; {st}", command=cmd))  # fmt: skip
        rows.append(row(f"e2e.rss_ratio.{p['slices']}", f"peak RSS / int16 volume, "
                        f"{p['slices']} slices (one process: read + steps + write)",
                        p["rss_to_volume"], "x", target=4.0, detail=f"{p['max_rss_mb']:.0f} MB vs "
                        f"{p['volume_int16_mb']:.0f} MB volume", command=cmd))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Small series, 1 run (debugging).")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="Slice counts of the cost.")
    ap.add_argument("--studies", type=int, default=None, help="Studies in the throughput stream.")
    ap.add_argument("--stream-slices", type=int, default=None, help="Slices per stream study.")
    ap.add_argument("--latency-slices", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["cost", "platform"])
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    sizes = args.sizes or ([50, 100, 200] if args.quick else [100, 200, 400, 800])
    cmd = command_line("bench.bench_e2e")
    raw: dict[str, Any] = {"runs": runs}
    rows: list[dict] = []
    if "cost" not in args.skip:
        raw["cost"] = cost_vs_slices(sizes, runs)
        rows += _cost_rows(raw["cost"], cmd)
    if "platform" not in args.skip:
        raw["platform"] = platform_bench(
            latency_slices=args.latency_slices or (100 if args.quick else 400),
            latency_runs=runs,
            studies=args.studies or (4 if args.quick else 50),
            stream_slices=args.stream_slices or (50 if args.quick else 100),
            fetch_runs=runs,
            cost=raw.get("cost"),
        )
        rows += platform_rows(raw["platform"], cmd)
    path = write_result("e2e", rows, raw, cmd)
    for r in json.loads(path.read_text())["rows"]:
        v = "n/a" if r["value"] is None else f"{r['value']:.3g} {r['unit']}"
        print(f"  {r['what']:<72} {v:>12}  {r['detail'][:120]}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
