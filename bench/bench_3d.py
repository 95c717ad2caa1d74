"""Benchmark: 3D post-processing on a synthetic 400 x 512² CT (issue 3).

In one fresh child process (so peak RSS covers read + every stage): read the series, then
``--runs`` times each: body + lungs + bone segmentation, lungs SEG build + write (and its SR),
bone mesh (smoothed, <= 300k triangles) + Encapsulated STL write, rotating MIP 36 views.
The first SEG is built once before timing: highdicom loads its standard tables on first use
(about 1 s, once per worker process). Writes ``bench/results/3d.json``.

Run: ``.venv/bin/python -m bench.bench_3d [--slices 400] [--size 512] [--runs 3]``
Targets: segmentations <= 4 s; SEG build + write <= 1.5 s; bone mesh + STL <= 1 s;
rotating MIP 36 views <= 3 s; peak RSS <= 1.2 GB.
"""

from __future__ import annotations

import argparse
import statistics

from bench.common import command_line, row, run_python, synthetic_series, write_result

_CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
from pipelines import get_step
from workers.reading.series import read_series, scan
from workers.writers import Provenance, write_output
from workers.writers.seg import build_seg, unvalidated
from workers.writers.sr import write_volume_report

runs = int(sys.argv[2])
source = read_series(scan([Path(sys.argv[1])])[0])
out = Path(tempfile.mkdtemp(prefix="bench3d-"))
t = {k: [] for k in ("body", "lungs", "bone", "segment_total", "seg_write", "sr_write",
                     "mesh", "stl_write", "mesh_stl", "mip36")}
extra = {}

def call(name, **params):
    st = get_step(name)
    p = st.validate(params)
    t0 = time.perf_counter()
    (o,) = st(source.volume, p, ())
    return o, time.perf_counter() - t0, Provenance("bench", st, p, 0, 0, o.description)

lm, _, prov = call("segment.lungs")
build_seg(lm, source, prov)  # warm highdicom's standard tables (once per process)
del lm
for _ in range(runs):
    total = 0.0
    for name in ("body", "lungs", "bone"):
        o, dt, p = call("segment." + name)
        t[name].append(dt); total += dt
        if name == "lungs":
            lungs, lungs_prov = o, p
        if name == "bone":
            bone = o
    t["segment_total"].append(total)
    t0 = time.perf_counter()
    with unvalidated():  # as the labelmap writer does
        seg, number, desc, _ = build_seg(lungs, source, lungs_prov)
        seg.save_as(out / "seg.dcm")
    t["seg_write"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    write_volume_report(lungs, seg, source, lungs_prov, out)
    t["sr_write"].append(time.perf_counter() - t0)
    st = get_step("mesh.surface"); p = st.validate({"segment": "bone"})
    t0 = time.perf_counter()
    (mesh,) = st(source.volume, p, (bone,))
    t1 = time.perf_counter()
    write_output(mesh, source, Provenance("bench", st, p, 3, 0, mesh.description), out)
    t2 = time.perf_counter()
    t["mesh"].append(t1 - t0); t["stl_write"].append(t2 - t1); t["mesh_stl"].append(t2 - t0)
    extra["triangles"] = int(len(mesh.faces))
    mip, dt, _ = call("projection.rotating_mip")
    t["mip36"].append(dt)
    extra["mip_shape"] = list(mip.image.GetSize())
    import SimpleITK as sitk, numpy as np
    vox = float(np.prod(source.volume.image.GetSpacing())) / 1e3
    for lm in (lungs, bone):
        a = sitk.GetArrayViewFromImage(lm.image)
        extra[lm.description + "_ml"] = {
            s.name: round(np.count_nonzero(a == s.label) * vox, 1) for s in lm.segments}
        del a
    # A job keeps its outputs, but successive runs must not pile up.
    del o, seg, mesh, mip, lungs, bone, lm
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"times": t, "max_rss_mb": rss, "extra": extra}))
"""

TARGETS = {
    "segment_total": ("body + lungs + bone segmentation", 4.0),
    "seg_write": ("lungs SEG build + write (2 segments)", 1.5),
    "mesh_stl": ("bone mesh (smoothed, <= 300k triangles) + STL write", 1.0),
    "mip36": ("rotating MIP, 36 views", 3.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    folder = synthetic_series(args.slices, size=args.size)
    sample = run_python(_CHILD, str(folder), str(args.runs), timeout=1800)
    inner = sample.inner
    med = {k: statistics.median(v) for k, v in inner["times"].items()}
    cmd = command_line("bench.bench_3d")
    rows = [
        row(
            k,
            what,
            med[k],
            "s",
            target=target,
            command=cmd,
            detail=f"min {min(inner['times'][k]):.3f}, max {max(inner['times'][k]):.3f}",
        )
        for k, (what, target) in TARGETS.items()
    ]
    rows += [
        row(k, k.replace("_", " "), med[k], "s", target=None, command=cmd)
        for k in ("body", "lungs", "bone", "sr_write", "mesh", "stl_write")
    ]
    rows.append(
        row(
            "peak_rss",
            "peak RSS (read + all stages)",
            inner["max_rss_mb"],
            "MB",
            target=1200.0,
            command=cmd,
        )
    )
    path = write_result(
        "3d",
        rows,
        {
            "times": inner["times"],
            "extra": inner["extra"],
            "slices": args.slices,
            "size": args.size,
        },
        cmd,
    )
    print(f"{args.slices} x {args.size}² synthetic CT, median of {args.runs}:")
    for r in rows:
        target = f" (target {r['op']} {r['target']:g})" if r["target"] is not None else ""
        print(f"  {r['what']:<55} {r['value']:>9.3f} {r['unit']}{target}")
    print(f"  extra: {inner['extra']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
