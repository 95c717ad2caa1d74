"""Benchmark: DICOM series -> volume on a synthetic 400 x 512² int16 CT.

Measures ``read_series(scan(folder))`` wall time and peak RSS, each run in a fresh subprocess
(median of 3, warm page cache), against the ``cat`` floor, the import-only RSS and, when
installed, dcm2niix. Prints a table and writes ``bench/results/read.json``.

Run: ``.venv/bin/python -m bench.bench_read [--slices 400] [--size 512] [--runs 3]``
Targets (issue 2): read <= 1.0 s and <= 600 MB peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.synthetic import write_synthetic_ct

RESULTS = Path(__file__).resolve().parent / "results" / "read.json"

_CHILD = """
import json, resource, sys, time
{imports}
t0, c0 = time.perf_counter(), time.process_time()
{work}
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": seconds, "cpu_s": cpu, "max_rss_mb": rss, "extra": extra}}))
"""

_READ = (
    "from workers.reading.series import read_series, scan",
    "src = read_series(scan(sys.argv[1])[0]); img = src.volume.image\n"
    "extra = [img.GetPixelIDTypeAsString(), list(img.GetSize())]",
)
_IMPORT_ONLY = (
    "from workers.reading.series import read_series, scan",
    "extra = None",
)


def _child(imports: str, work: str, folder: Path) -> dict:
    code = _CHILD.format(imports=imports, work=work)
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="sprim-bench-read-") as tmp:
        folder = Path(tmp) / "ct"
        t0 = time.perf_counter()
        files = write_synthetic_ct(folder, n_slices=args.slices, size=args.size, seed=0)
        gen_s = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        cat = ["sh", "-c", f"cat {folder}/*.dcm > /dev/null"]
        _timed(cat)  # warm the page cache
        cat_s = [_timed(cat) for _ in range(args.runs)]
        reads = [_child(*_READ, folder) for _ in range(args.runs)]
        imports = _child(*_IMPORT_ONLY, folder)
        peer = None
        if shutil.which("dcm2niix"):
            out = Path(tmp) / "nii"
            out.mkdir()
            cmd = ["dcm2niix", "-z", "n", "-o", str(out), str(folder)]
            peer_runs = []
            for _ in range(args.runs):
                code = (
                    "import resource,subprocess,sys,time;t=time.perf_counter();"
                    "subprocess.run(sys.argv[1:],check=True,capture_output=True);"
                    "print(time.perf_counter()-t,"
                    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024)"
                )
                res = subprocess.run(
                    [sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True
                )
                s, rss = map(float, res.stdout.split())
                peer_runs.append({"seconds": s, "max_rss_mb": rss})
                for f in out.iterdir():
                    f.unlink()
            peer = {
                "seconds": statistics.median(r["seconds"] for r in peer_runs),
                "max_rss_mb": statistics.median(r["max_rss_mb"] for r in peer_runs),
            }

    read_s = statistics.median(r["seconds"] for r in reads)
    read_rss = statistics.median(r["max_rss_mb"] for r in reads)
    floor = statistics.median(cat_s)
    result = {
        "what": f"read_series(scan()) of a synthetic {args.slices} x {args.size}² int16 CT",
        "command": " ".join([".venv/bin/python -m bench.bench_read", *sys.argv[1:]]),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "series_mb": round(size_mb, 1),
        "generate_s": round(gen_s, 3),
        "cat_floor_s": round(floor, 4),
        "read_s": round(read_s, 3),
        "read_runs_s": [round(r["seconds"], 3) for r in reads],
        "read_cpu_s": round(statistics.median(r["cpu_s"] for r in reads), 3),
        "read_max_rss_mb": round(read_rss, 1),
        "import_only_rss_mb": round(imports["max_rss_mb"], 1),
        "volume": reads[0]["extra"],
        "ratio_to_cat": round(read_s / floor, 1),
        "dcm2niix": peer,
        "targets": {"read_s": 1.0, "max_rss_mb": 600},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    rows = [
        ("cat floor (warm cache)", f"{floor:.3f} s", "", ""),
        (
            "read_series(scan())",
            f"{read_s:.3f} s",
            f"{read_rss:.0f} MB",
            f"{read_s / floor:.1f}x cat; target <= 1.0 s, <= 600 MB; "
            f"CPU {result['read_cpu_s']:.3f} s",
        ),
        ("python + imports only", "", f"{imports['max_rss_mb']:.0f} MB", ""),
    ]
    if peer:
        rows.append(
            ("dcm2niix (peer)", f"{peer['seconds']:.3f} s", f"{peer['max_rss_mb']:.0f} MB", "")
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{args.slices} x {args.size}² int16 CT, {size_mb:.0f} MB, median of {args.runs} "
        f"(load average {load} on {os.cpu_count()} CPUs)"
    )
    for r in rows:
        print(f"  {r[0]:<26} {r[1]:>9} {r[2]:>8}  {r[3]}")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()
