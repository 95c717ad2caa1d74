"""Peak memory of the default CT rules on a 400 x 512² CT (issue 13 item 5), fresh processes.

Each default CT rule (``ct-volume-mpr``, ``ct-chest-lungs``, ``ct-bone-3d`` of
``workers/processing/default_rules.yaml``) runs alone with ``sprim run --rules`` in a fresh
process: what a Celery pool process peaks at for that job once pool processes are recycled
after large jobs (``SPRIM_WORKER_RECYCLE_MB``). Then all three in one process, one after the
other (a pool process never recycled). Peak RSS is the child's ``ru_maxrss`` (``wait4``),
divided by the int16 volume (400 x 512² x 2 bytes = 200 MiB). Also the interpreter with the
libraries the steps use (the fixed part of any job).

Writes ``bench/results/memory.json``. Run: ``.venv/bin/python -m bench.bench_memory [--slices 400]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    BIN,
    ROOT,
    command_line,
    print_result,
    row,
    run_cmd,
    run_python,
    synthetic_series,
    write_result,
)

RULES = ("ct-volume-mpr", "ct-chest-lungs", "ct-bone-3d")
LIBRARIES = (
    "import tasks.main, numpy, SimpleITK, pydicom, highdicom, vtkmodules.vtkFiltersCore, "
    "scipy.ndimage, PIL.Image, pipelines.steps, workers.writers.derived_series, workers.writers.seg"
)


def _rules_file(names: tuple[str, ...], folder: Path) -> Path:
    doc = yaml.safe_load((ROOT / "workers/processing/default_rules.yaml").read_text())
    picked = []
    for r in doc["rules"]:
        if r["name"] in names:
            r = {k: v for k, v in r.items() if k != "trigger"}  # no quiet period in `sprim run`
            picked.append(r)
    path = folder / f"rules-{len(picked)}-{picked[0]['name']}.yaml"
    path.write_text(yaml.safe_dump({"rules": picked}, sort_keys=False))
    return path


def peak(series: Path, names: tuple[str, ...], tmp: Path) -> dict[str, Any]:
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    rules = _rules_file(names, tmp)
    s = run_cmd([str(BIN / "sprim"), "run", str(series), "--out", str(out), "--rules",
                 str(rules)], timeout=900)  # fmt: skip
    return {"rules": list(names), "seconds": round(s.seconds, 2), "max_rss_mib": s.max_rss_mb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="100 slices (debugging).")
    args = ap.parse_args()
    n = 100 if args.quick else args.slices
    series = synthetic_series(n)
    volume_mib = n * 512 * 512 * 2 / 2**20
    cmd = command_line("bench.bench_memory")
    load0 = os.getloadavg()
    raw: dict[str, Any] = {"slices": n, "volume_mib": volume_mib, "rules": {}}
    with tempfile.TemporaryDirectory(prefix="sprim-bench-memory-") as t:
        tmp = Path(t)
        raw["libraries_mib"] = run_python(LIBRARIES).max_rss_mb
        for name in RULES:
            raw["rules"][name] = peak(series, (name,), tmp)
        raw["all_in_one_process"] = peak(series, RULES, tmp)
    raw["load_avg"] = [load0, os.getloadavg()]
    per = {k: v["max_rss_mib"] / volume_mib for k, v in raw["rules"].items()}
    worst = max(per, key=per.__getitem__)
    allp = raw["all_in_one_process"]["max_rss_mib"]
    detail = "; ".join(f"{k} {raw['rules'][k]['max_rss_mib']:.0f} MiB ({v:.2f}x)"
                       for k, v in per.items())  # fmt: skip
    rows = [
        row("memory.rule_rss_ratio", f"peak RSS / int16 volume, default CT rules, one job per "
            f"fresh process (a recycled pool process), {n} x 512²", per[worst], "x", target=4.0,
            detail=f"worst {worst}; {detail}; volume {volume_mib:.0f} MiB; python + the "
            f"libraries the steps use {raw['libraries_mib']:.0f} MiB", command=cmd),
        row("memory.all_rules_rss_ratio", f"peak RSS / int16 volume, the 3 default CT rules one "
            f"after the other in one process, {n} x 512²", allp / volume_mib, "x",
            detail=f"{allp:.0f} MiB; {raw['all_in_one_process']['seconds']:.1f} s", command=cmd),
    ]  # fmt: skip
    print_result(write_result("memory", rows, raw, cmd))


if __name__ == "__main__":
    main()
