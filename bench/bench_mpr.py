"""Benchmark: axial + coronal + sagittal 3 mm MPR computed and written (issue 2 target ≤ 3 s).

The synthetic 400 x 512² int16 CT (``bench.synthetic``, 0.7 x 0.7 x 1.0 mm) is read first (not
timed), then ``reformat.mpr`` (3 mm AVG, three planes) runs and the derived series writer writes
every slice; each run is a fresh process (median of ``--runs``), its peak RSS reported. A raw
floor writes the same number of files and bytes with plain ``open().write()`` in the same
process, so the DICOM writer's overhead is visible as a ratio. CPU time (process_time) is
reported beside wall time: on the shared 2-core machines wall time varies with the load.

Run: ``.venv/bin/python -m bench.bench_mpr [--slices 400] [--runs 3]``; writes
``bench/results/mpr.json``.
"""

from __future__ import annotations

import argparse

from bench.common import command_line, repeat, row, run_python, synthetic_series, write_result

TARGET_S = 3.0

CHILD = r"""
import json, shutil, sys, tempfile, time
from pathlib import Path
from pipelines import get_step
from workers.reading.series import read_series, scan
from workers.writers import Provenance, write_output

source = read_series(scan(Path(sys.argv[1]))[0])
step = get_step("reformat.mpr")
params = step.validate({"thickness_mm": 3.0, "mode": "AVG"})
out = Path(tempfile.mkdtemp(prefix="sprim-bench-mpr-"))
try:
    c0, t0 = time.process_time(), time.perf_counter()
    outputs = step(source.volume, params)
    t1 = time.perf_counter()
    written = []
    for j, o in enumerate(outputs):
        prov = Provenance("bench", step, params, 0, j, f"{j}:{o.description}")
        written += write_output(o, source, prov, out)
    t2, c2 = time.perf_counter(), time.process_time()
    sizes = [w.path.stat().st_size for w in written]
    # Floor: the same files and bytes written raw, no DICOM encoding, no computation.
    floor_dir = out / "floor"
    floor_dir.mkdir()
    blobs = [w.path.read_bytes() for w in written[:1]] * len(written)
    t3 = time.perf_counter()
    for k, size in enumerate(sizes):
        (floor_dir / f"{k}.bin").write_bytes(blobs[0][:size])
    t4 = time.perf_counter()
    planes = {o.description: list(o.image.GetSize()) for o in outputs}
finally:
    shutil.rmtree(out, ignore_errors=True)
print(json.dumps({"total_s": t2 - t0, "cpu_s": c2 - c0, "compute_s": t1 - t0, "write_s": t2 - t1,
                  "floor_write_s": t4 - t3, "files": len(written),
                  "mb_written": sum(sizes) / 1e6, "planes": planes}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    folder = synthetic_series(args.slices)
    stat, samples = repeat(lambda: run_python(CHILD, str(folder)), args.runs, key="total_s")
    inner = [s.inner for s in samples]

    def median(key: str) -> float:
        vals = sorted(float(i[key]) for i in inner)
        return vals[len(vals) // 2]

    cmd = command_line("bench.bench_mpr")
    size = f"{args.slices} x 512² int16 CT"
    rows = [
        row("mpr.total", f"AX+COR+SAG 3 mm AVG MPR computed and written, {size}",
            stat.median, "s", target=TARGET_S if args.slices == 400 else None, command=cmd,
            detail=f"runs {[round(x, 3) for x in stat.runs]}; {inner[0]['files']} files, "
                   f"{inner[0]['mb_written']:.0f} MB"),
        row("mpr.cpu", "CPU time of the same (process_time: what an idle machine's wall would be, "
            "roughly; the machine is shared)", median("cpu_s"), "s", command=cmd),
        row("mpr.compute", "of which reformat.mpr (3 planes)", median("compute_s"), "s",
            command=cmd),
        row("mpr.write", "of which derived-series writer (3 series)", median("write_s"), "s",
            command=cmd),
        row("mpr.write_vs_raw", "writer time / raw write of the same files and bytes",
            median("write_s") / max(median("floor_write_s"), 1e-9), "x", command=cmd),
        row("mpr.peak_rss", "peak RSS of the process (read volume + MPR + write)",
            stat.max_rss_mb, "MB", command=cmd),
    ]  # fmt: skip
    raw = {"stat": stat.to_dict(), "runs": inner, "slices": args.slices, "folder": str(folder)}
    path = write_result("mpr", rows, raw, cmd)
    for r in rows:
        print(
            f"{r['what']}: {r['value']} {r['unit']}" + (f" ({r['detail']})" if r["detail"] else "")
        )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
