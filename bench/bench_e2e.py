"""End to end: the default CT rule through Orthanc and RabbitMQ, throughput, cost vs slices.

1. **Cost vs slice count** (no services): a fresh process per run reads a synthetic 512² CT of
   100/200/400/800 slices and runs the built-in MPR rule on it (what ``sprim run`` does for that
   rule, start-up excluded), writing DICOM; a least-squares line gives cost per slice and R².
2. **Stages** (no services; skipped when ``bench_3d.py`` exists): segmentations, bone mesh and
   rotating MIP on the 400-slice CT, each step and its DICOM write timed apart.
3. **Platform**: a private Orthanc (DICOMweb, StableAge 2 s), a private RabbitMQ vhost,
   ``celery -A tasks worker -c 2`` (two worker processes) and ``sprim watch`` (built-in rules,
   their quiet period set to the StableAge: routed at ``StableStudy``).
   Latency: after a small warm-up study, a 400-slice CT is sent with ``storescu``; the clock
   starts when Orthanc publishes ``StableStudy`` and stops when every job of the study is
   ``done`` (outputs confirmed stored in Orthanc). The floor, in the same run: the outputs of
   the last latency study sent again by dcmtk ``storescu`` (``TCP_NODELAY=1``) into a fresh
   Orthanc configured the same; the latency is also given as a ratio to it. Throughput
   (``--skip throughput`` leaves it out): a stream of studies is loaded while the watcher is
   stopped; the watcher starts and studies/hour is measured from its start
   to the last job done. WADO-RS fetch vs ``curl`` of the same URL and Orthanc's zip archive
   (skipped when ``bench_archive.py`` measures it).

Writes ``bench/results/e2e.json``.

Run: ``.venv/bin/python -m bench.bench_e2e [--quick] [--runs 3] [--skip cost stages platform]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from bench.common import (
    RESULTS,
    Platform,
    command_line,
    print_result,
    repeat,
    row,
    run_cmd,
    run_python,
    series_mb,
    storescu,
    study_uid_of,
    synthetic_series,
    write_result,
)

COST = """
import json, sys, tempfile, time
from pathlib import Path
t0 = time.perf_counter()
from workers.processing.offline import plan_rules
from workers.processing.runner import run_steps
from workers.reading.series import read_series, scan
import workers.writers._builtin  # noqa: F401
plan = plan_rules(None)  # built-in rules, every step imported: start-up, not per-series cost
startup = time.perf_counter() - t0
t = {}
t0 = time.perf_counter()
found = scan(Path(sys.argv[1]))
t["scan"] = time.perf_counter() - t0
jobs, _ = plan(found)
t["route"] = time.perf_counter() - t0 - t["scan"]
if sys.argv[2] != "*":  # one rule (the MPR rule by default): a steady unit of work per slice
    jobs = [j for j in jobs if j.rule == sys.argv[2]] or jobs
out = {"startup_s": startup, "jobs": len(jobs), "rules": sorted({j.rule for j in jobs})}
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


STAGE = """
import json, sys, tempfile, time
from pathlib import Path
from pipelines import get_step
from workers.reading.series import read_series, scan
from workers.writers import Provenance, write_output
import workers.writers._builtin  # noqa: F401
try:
    import highdicom  # noqa: F401  (SEG/SR writers import it lazily: start-up, not stage, cost)
except ImportError:
    pass
steps = [get_step(n) for n in sys.argv[2].split(",")]
t = {}
t0 = time.perf_counter()
src = read_series(scan(Path(sys.argv[1]))[0])
t["read"] = time.perf_counter() - t0
prior = []
with tempfile.TemporaryDirectory(prefix="sprim-bench-stage-") as d:
    for i, st in enumerate(steps):
        params = st.validate({})
        t0 = time.perf_counter()
        outs = st(src.volume, params, tuple(prior))
        t[st.name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for j, o in enumerate(outs):
            prov = Provenance("bench", st, params, i, j, f"{j}:{o.description}")
            write_output(o, src, prov, Path(d))
        t[st.name + " write"] = time.perf_counter() - t0
        prior += outs
print(json.dumps({"stages": t}))
"""
#: Step chains timed on their own (step and write separately) when no bench_3d.py does it.
STAGES = {
    "segmentation": "segment.body,segment.lungs,segment.bone",
    "bone_mesh": "segment.bone,mesh.surface",
    "rotating_mip": "projection.rotating_mip",
}


def stages(n_slices: int, runs: int) -> dict[str, Any]:
    """Each chain of :data:`STAGES` in fresh processes: per-step and per-write medians, RSS."""
    folder = synthetic_series(n_slices)
    out: dict[str, Any] = {"slices": n_slices}
    for label, chain in STAGES.items():
        try:
            _, samples = repeat(lambda c=chain: run_python(STAGE, str(folder), c), runs)
        except RuntimeError as e:
            out[label] = {"error": str(e).strip().splitlines()[-1][:300]}
            continue
        keys = samples[0].inner["stages"]
        out[label] = {
            "stages_s": {k: statistics.median(s.inner["stages"][k] for s in samples) for k in keys},
            "max_rss_mb": round(max(s.max_rss_mb for s in samples), 1),
        }
    return out


def _stage_rows(st: dict[str, Any], cmd: str) -> list[dict]:
    rows = []
    for label in STAGES:
        d = st.get(label) or {}
        if "error" in d:
            rows.append(row(f"e2e.stage.{label}", f"{label} ({st['slices']} slices)", None, "s",
                            detail=f"not measured: {d['error']}", command=cmd))  # fmt: skip
            continue
        for k, v in d.get("stages_s", {}).items():
            if k != "read":
                what = f"stage {k} ({st['slices']} slices, chain: {label})"
                rows.append(row(f"e2e.stage.{label}.{k}", what, v, "s", command=cmd))
        rows.append(row(f"e2e.stage_rss.{label}", f"peak RSS, {label} chain (read included)",
                        d.get("max_rss_mb"), "MB", command=cmd))  # fmt: skip
    return rows


#: The built-in rule timed by the cost-vs-slices part ("*": every rule that matches).
COST_RULE = "ct-volume-mpr"


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


def cost_vs_slices(sizes: list[int], runs: int, rule: str = COST_RULE) -> dict[str, Any]:
    """Read + the rule's steps + DICOM write per slice count, each run a fresh process."""
    points = []
    for n in sizes:
        folder = synthetic_series(n)
        _, samples = repeat(lambda f=folder: run_python(COST, str(f), rule), runs)
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
    if len(points) < 2:
        return {"points": points}
    return {
        "points": points,
        "fit_total": fit(xs, [p["total_s"]["median"] for p in points]),
        "fit_min": fit(xs, [p["total_s"]["min"] for p in points]),  # least disturbed by load
    }


def _cost_rows(cost: dict[str, Any], cmd: str) -> list[dict]:
    rows = []
    pts = cost.get("points", [])
    if not pts:
        return rows
    line, low = cost.get("fit_total") or {}, cost.get("fit_min") or {}
    if line:
        sizes = ", ".join(str(p["slices"]) for p in pts)
        medians = ", ".join(f"{p['total_s']['median']:.2f} s" for p in pts)
        detail = (
            f"{line['slope'] * 100:.2f} s per 100 slices, intercept {line['intercept']:.2f} s, "
            f"R² {line['r2']:.3f}; fit of the minimums {low['slope'] * 1000:.2f} ms/slice, R² "
            f"{low['r2']:.3f}; over {sizes} slices ({medians})"
        )
        rules = ", ".join(sorted({r for p in pts for r in p["rules"]}))
        what = f"cost vs slice count: read + rule {rules} + write (slope)"
        rows.append(row("e2e.cost_slope", what, line["slope"] * 1000, "ms/slice", detail=detail,
                        command=cmd))  # fmt: skip
        what = "cost vs slice count: linearity (R² of the fit of the medians)"
        rows.append(row("e2e.cost_r2", what, line["r2"], "", target=0.98, op=">=", command=cmd))
    for p in pts:
        st = ", ".join(f"{k} {v:.2f}" for k, v in p["stages_s"].items() if k != "total")
        rows.append(row(f"e2e.cost.{p['slices']}", f"read + rule + write, {p['slices']} "
                        f"slices (rules: {', '.join(p['rules']) or 'none'})",
                        p["total_s"]["median"], "s", detail=f"min {p['total_s']['min']:.2f}, "
                        f"max {p['total_s']['max']:.2f}; {st}", command=cmd))  # fmt: skip
        rows.append(row(f"e2e.rss_ratio.{p['slices']}", f"peak RSS / int16 volume, "
                        f"{p['slices']} slices (one process: read + steps + write)",
                        p["rss_to_volume"], "x", target=4.0, detail=f"{p['max_rss_mb']:.0f} MB vs "
                        f"{p['volume_int16_mb']:.0f} MB volume", command=cmd))  # fmt: skip
    return rows


# -- platform: Orthanc + RabbitMQ + 2 worker processes + sprim watch --------------------------
FETCH = """
import json, sys, tempfile, time
from pathlib import Path
from workers.archives.dicomweb import DicomWebArchive
with tempfile.TemporaryDirectory(prefix="sprim-bench-fetch-") as d:
    t0 = time.perf_counter()
    files = DicomWebArchive(sys.argv[1]).fetch_series(sys.argv[2], sys.argv[3], Path(d))
    dt = time.perf_counter() - t0
    mb = sum(f.stat().st_size for f in files) / 1e6
print(json.dumps({"seconds": dt, "files": len(files), "mb": mb}))
"""


def _job_summary(jobs: list) -> dict[str, Any]:
    timings: dict[str, float] = {}
    for j in jobs:
        for k, v in (j.timings or {}).items():
            timings[k] = timings.get(k, 0.0) + v
    return {
        "jobs": len(jobs),
        "states": sorted(j.state for j in jobs),
        "errors": [j.error for j in jobs if j.error][:3],
        "rules": sorted({j.rule or "" for j in jobs}),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "outputs": sum(len(o.get("instances", [])) for j in jobs for o in (j.outputs or [])),
        "queue_wait_s": max((j.started_at or 0) - j.created_at for j in jobs) if jobs else None,
    }


def platform_bench(
    *, latency_slices: int, latency_runs: int, studies: int, stream_slices: int, fetch_runs: int,
) -> dict[str, Any]:  # fmt: skip
    """Latency, throughput and fetch figures on a private platform (see module docstring)."""
    from tests.harness.orthanc import orthanc_available

    if not orthanc_available():
        return {"error": "Orthanc + DICOMweb plugin not installed"}
    out: dict[str, Any] = {"latency": [], "stable_age_s": 2}
    warm = synthetic_series(24, seed=9)  # data first: generation is not part of the platform
    latency_folders = [synthetic_series(latency_slices, seed=10 + k) for k in range(latency_runs)]
    folders = [synthetic_series(stream_slices, seed=1000 + i) for i in range(studies)]
    with (
        tempfile.TemporaryDirectory(prefix="sprim-bench-e2e-") as tmp,
        _rules(Path(tmp), out["stable_age_s"]),
        Platform(Path(tmp), stable_age=out["stable_age_s"]) as p,
    ):
        storescu(p.orthanc, [warm])  # warm-up: imports, rules, connections (unmeasured)
        p.wait_done({study_uid_of(warm)}, timeout=600)
        for k, folder in enumerate(latency_folders):
            uid = study_uid_of(folder)
            t_send = time.time()
            send_s = storescu(p.orthanc, [folder])
            cpu0 = _cpu_s(p)
            stable = p.wait_stable({uid})[uid]
            jobs = p.wait_done({uid})
            cpu = {k: round(v - cpu0[k], 2) for k, v in _cpu_s(p).items()}
            done = max(j.finished_at or 0 for j in jobs)
            out["latency"].append(
                {"slices": latency_slices, "send_s": send_s, "stable_after_send_s":
                 stable - t_send - send_s, "stable_to_done_s": done - stable,
                 "last_instance_to_done_s": done - t_send - send_s,
                 "route_delay_s": min(j.created_at for j in jobs) - stable,
                 "cpu_s": cpu, **_job_summary(jobs)}
            )  # fmt: skip
            if k == 0 and fetch_runs:
                out["fetch"] = _fetch_vs_archive(p, folder, uid, fetch_runs)
        if latency_folders:  # the floor: Orthanc ingesting the same outputs from storescu
            out["ingest_floor"] = _ingest_floor(p, Path(tmp), jobs, latency_runs)
        try:
            if folders:
                out["throughput"] = _stream(p, folders, stream_slices)
        except Exception as e:  # noqa: BLE001  (keep the latency figures)
            out["throughput_error"] = f"{type(e).__name__}: {str(e).strip()[-300:]}"
        out["worker_peak_rss_mb"] = {str(k): round(v, 1) for k, v in p.peak_rss.items()}
    return out


def _cpu_s(p: Platform) -> dict[str, float]:
    """CPU seconds (user + system) used so far by the worker (main + pool processes), Orthanc
    and the watcher: what the 2 cores were given to, for the floor a run cannot beat."""
    import psutil

    def tree(pid: int | None) -> float:
        if pid is None:
            return 0.0
        try:
            procs = [psutil.Process(pid)]
            procs += procs[0].children(recursive=True)
            # pool processes replaced since (SPRIM_WORKER_RECYCLE_MB): reaped by the main one
            t = procs[0].cpu_times()
            total = t.children_user + t.children_system
        except psutil.Error:
            return 0.0
        for q in procs:
            try:
                t = q.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total

    return {
        "workers": tree(p.worker.pid if p.worker else None),
        "orthanc": tree(p.orthanc.proc.pid if p.orthanc.proc else None),
        "watch": tree(p.watcher.pid if p.watcher else None),
    }


@contextlib.contextmanager
def _rules(tmp: Path, stable_age: int) -> Iterator[None]:
    """The built-in rules with their quiet period equal to Orthanc's StableAge: routing at
    ``StableStudy`` (what the clock starts at), whatever quiet period the defaults carry."""
    from workers.processing.routing import DEFAULT_RULES

    text = DEFAULT_RULES.read_text()
    rules = tmp / "rules.yaml"
    rules.write_text(re.sub(r"quiet_period: *\w+", f"quiet_period: {stable_age}s", text))
    old = os.environ.get("SPRIM_RULES_FILE")
    os.environ["SPRIM_RULES_FILE"] = str(rules)  # the platform's processes inherit it
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPRIM_RULES_FILE", None)
        else:
            os.environ["SPRIM_RULES_FILE"] = old


def _ingest_floor(p: Platform, root: Path, jobs: list, runs: int) -> dict[str, Any]:
    """Orthanc's own ingest of one study's outputs: the same objects (downloaded back by WADO-RS,
    byte for byte) sent by dcmtk ``storescu`` (one association, ``TCP_NODELAY=1``) into a fresh
    Orthanc configured like the platform's, ``runs`` times (a fresh Orthanc each)."""
    import psutil

    from tests.harness.orthanc import OrthancServer
    from workers.archives.dicomweb import DicomWebArchive

    folder = root / "outputs"
    archive = DicomWebArchive(p.orthanc.dicomweb_url)
    for j in jobs:
        for o in j.outputs or []:
            archive.fetch_series(j.study_uid, o["series_uid"], folder / o["series_uid"])
    files = sorted(folder.rglob("*.dcm"))
    times: list[float] = []
    cpu: list[float] = []
    for k in range(max(1, runs)):
        with OrthancServer(root / f"floor-{k}", stable_age=p.orthanc.config["StableAge"]) as floor:
            args = ["storescu", "-aet", "BENCH", "-aec", floor.aet, "-R", "-nh", "+sd", "+r",
                    "127.0.0.1", str(floor.dicom_port), str(folder)]  # fmt: skip
            c0 = psutil.Process(floor.proc.pid).cpu_times()
            times.append(run_cmd(args, timeout=600).seconds)
            c1 = psutil.Process(floor.proc.pid).cpu_times()
            cpu.append(c1.user + c1.system - c0.user - c0.system)
            n = floor.get("/statistics").json()["CountInstances"]
            if n != len(files):
                raise RuntimeError(f"floor Orthanc kept {n} of {len(files)} outputs")
    return {"objects": len(files), "mb": round(sum(f.stat().st_size for f in files) / 1e6, 1),
            "seconds": statistics.median(times), "runs": times,
            "orthanc_cpu_s": round(statistics.median(cpu), 2)}  # fmt: skip


def _stream(p: Platform, folders: list[Path], slices: int) -> dict[str, Any]:
    """Load the studies with the watcher stopped; studies/hour from its start to the last done."""
    uids = {study_uid_of(f) for f in folders}
    p.stop_watch()
    send_s = storescu(p.orthanc, folders)
    p.wait_stable(uids)
    t0 = time.time()
    p.start_watch()
    jobs = p.wait_done(uids, timeout=1800)
    t_end = max(j.finished_at or 0 for j in jobs)
    return {
        "studies": len(folders), "slices": slices, "send_s": send_s, "seconds": t_end - t0,
        "studies_per_hour": len(folders) / (t_end - t0) * 3600, **_job_summary(jobs),
    }  # fmt: skip


def _fetch_vs_archive(p: Platform, folder: Path, uid: str, runs: int) -> dict[str, Any]:
    import pydicom

    first = next(iter(sorted(folder.glob("*.dcm"))))
    series_uid = str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)
    hit = requests.post(p.orthanc.url + "/tools/lookup", data=series_uid, timeout=10).json()
    sid = next(h["ID"] for h in hit if h["Type"] == "Series")
    wado = f"{p.orthanc.dicomweb_url}/studies/{uid}/series/{series_uid}"
    accept = 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*'
    res: dict[str, Any] = {"mb": round(series_mb(folder), 1)}
    fetch, _ = repeat(lambda: run_python(FETCH, p.orthanc.dicomweb_url, uid, series_uid), runs,
                      key="seconds")  # fmt: skip
    res["sprim_fetch"] = fetch.to_dict()
    curl = ["curl", "-sf", "-o", "/dev/null", "-H", accept, wado]
    res["curl_wado"] = repeat(lambda: run_cmd(curl), runs)[0].to_dict()
    zip_cmd = ["curl", "-sf", "-o", "/dev/null", f"{p.orthanc.url}/series/{sid}/archive"]
    first_zip = run_cmd(zip_cmd, timeout=600)
    n_zip = runs if first_zip.seconds < 10 else 1  # ~23 s each on these machines
    zs = [first_zip.seconds] + [run_cmd(zip_cmd, timeout=600).seconds for _ in range(n_zip - 1)]
    res["orthanc_archive"] = {"median": statistics.median(zs), "min": min(zs), "max": max(zs),
                              "runs": zs}  # fmt: skip
    return res


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def platform_rows(pl: dict[str, Any], cmd: str) -> list[dict]:
    """Rows of the platform figures (or "not measured" rows saying why)."""
    if "error" in pl:
        why = f"not measured: {pl['error']}"
        return [
            row("e2e.latency_400", "end to end, default CT rule", None, "s", detail=why),
            row("e2e.throughput", "sustained throughput", None, "studies/h", detail=why),
        ]
    rows = []
    lat = pl["latency"]
    if lat:
        vals = [x["stable_to_done_s"] for x in lat]
        x0 = lat[0]
        tm = ", ".join(f"{k} {v:.2f}" for k, v in x0["timings"].items())
        bad = [x for x in lat if set(x["states"]) != {"done"}]
        detail = (
            f"min {min(vals):.2f}, max {max(vals):.2f}; rules {x0['rules']}; stable → job "
            f"created {x0['route_delay_s']:.2f} s; in the worker (s): {tm}; "
            f"{x0['outputs']} objects stored" + (f"; FAILED: {bad[0]['errors']}" if bad else "")
        )
        if x0.get("cpu_s"):
            c = x0["cpu_s"]
            detail += (f"; CPU from the last instance sent to all stored: workers {c['workers']:.1f}"
                       f" s, Orthanc {c['orthanc']:.1f} s, watch {c['watch']:.1f} s = "
                       f"{sum(c.values()) / 2:.1f} s of 2 cores")  # fmt: skip
        what = f"end to end, default CT rule, {x0['slices']}-slice CT: StableStudy → stored"
        rows.append(row("e2e.latency_400", what, _med(vals), "s", target=8.0, detail=detail,
                        command=cmd))  # fmt: skip
        fl = pl.get("ingest_floor")
        if fl:
            detail = (f"dcmtk storescu (TCP_NODELAY=1, one association) of the same {fl['objects']}"
                      f" objects ({fl['mb']:.0f} MB) into a fresh Orthanc like the platform's: "
                      f"runs {', '.join(f'{t:.2f}' for t in fl['runs'])} s; Orthanc CPU "
                      f"{fl.get('orthanc_cpu_s', 0):.1f} s")  # fmt: skip
            rows.append(row("e2e.ingest_floor", "Orthanc's own ingest of one study's outputs "
                            "(floor)", fl["seconds"], "s", detail=detail, command=cmd))  # fmt: skip
            detail = (f"StableStudy → stored {_med(vals):.2f} s / Orthanc ingest of the outputs "
                      f"{fl['seconds']:.2f} s")  # fmt: skip
            rows.append(row("e2e.latency_vs_ingest", "StableStudy → stored / Orthanc's own ingest"
                            " of those outputs", _med(vals) / fl["seconds"], "x", target=1.5,
                            detail=detail, command=cmd))  # fmt: skip
        li = [x["last_instance_to_done_s"] for x in lat]
        what = f"last instance in Orthanc → all outputs stored (StableAge {pl['stable_age_s']} s)"
        detail = f"storescu of the study {x0['send_s']:.2f} s"
        rows.append(row("e2e.last_instance_to_done", what, _med(li), "s", detail=detail,
                        command=cmd))  # fmt: skip
    th = pl.get("throughput")
    if "throughput_error" in pl:
        rows.append(row("e2e.throughput", "sustained throughput", None, "studies/h",
                        detail=f"not measured: {pl['throughput_error']}"))  # fmt: skip
    if th:
        bad = [s for s in th["states"] if s != "done"]
        detail = f"{th['seconds']:.1f} s from watcher start to last job done; {th['jobs']} jobs"
        if bad:
            detail += f", {len(bad)} not done: {th['errors']}"
        study_s = sum(th["timings"].values()) / max(1, th["studies"])
        detail += f"; {study_s:.1f} s of worker time per study"
        if lat and lat[0]["slices"] != th["slices"]:
            job_s = sum(lat[0]["timings"].values())  # all jobs of the 400-slice study
            est = th["studies_per_hour"] * study_s / job_s
            n = lat[0]["slices"]
            detail += (f"; scaled by the {n}-slice study ({job_s:.1f} s of worker time, alone): "
                       f"≈ {est:.0f} studies/h of {n} slices (upper bound)")  # fmt: skip
        what = (f"sustained throughput, 2 worker processes, {th['studies']} studies of "
                f"{th['slices']} slices")  # fmt: skip
        rows.append(row("e2e.throughput", what, th["studies_per_hour"], "studies/h", target=400.0,
                        op=">=", detail=detail, command=cmd))  # fmt: skip
    rss = pl.get("worker_peak_rss_mb") or {}
    if rss and lat:
        vol = lat[0]["slices"] * 512 * 512 * 2 / 2**20
        peak = max(rss.values())
        detail = f"{peak:.0f} MB vs {vol:.0f} MB ({lat[0]['slices']} x 512² int16)"
        what = "peak worker RSS / int16 volume (pool process VmHWM)"
        rows.append(row("e2e.worker_rss_ratio", what, peak / vol, "x", target=4.0, detail=detail,
                        command=cmd))  # fmt: skip
    f = pl.get("fetch")
    if f:
        s, c, z = f["sprim_fetch"], f["curl_wado"], f["orthanc_archive"]
        detail = (f"sprim {s['median']:.2f} s ({f['mb'] / s['median']:.0f} MB/s), curl "
                  f"{c['median']:.2f} s")  # fmt: skip
        rows.append(row("e2e.fetch_vs_curl", "WADO-RS fetch (sprim) / curl of the same URL",
                        s["median"] / c["median"], "x", detail=detail, command=cmd))  # fmt: skip
        detail = (f"zip {z['median']:.2f} s ({f['mb'] / z['median']:.0f} MB/s, "
                  f"{len(z['runs'])} run(s))")  # fmt: skip
        what = "Orthanc zip archive download / sprim WADO-RS fetch"
        rows.append(row("e2e.archive_vs_fetch", what, z["median"] / s["median"], "x",
                        detail=detail, command=cmd))  # fmt: skip
    return rows


#: Studies in the throughput stream of a full run (issue 6: 50). With the built-in CT rules (3 jobs
#: per study) 50 x 100 slices take 2-8 min here depending on the load; ``--studies`` changes it.
STREAM_STUDIES = 50


def _sigterm(*_: object) -> None:
    raise SystemExit("terminated (time limit)")  # unwinds: Platform stops what it started


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Small series, 1 run (debugging).")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="Slice counts of the cost.")
    ap.add_argument("--studies", type=int, default=None, help="Studies in the throughput stream.")
    ap.add_argument("--stream-slices", type=int, default=None, help="Slices per stream study.")
    ap.add_argument("--latency-slices", type=int, default=None)
    ap.add_argument("--cost-rule", default=COST_RULE, help='Rule timed vs slices ("*": all).')
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["cost", "stages", "platform", "fetch", "throughput"])  # fmt: skip
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 3)
    sizes = args.sizes or ([50, 100, 200] if args.quick else [100, 200, 400, 800])
    cmd = command_line("bench.bench_e2e")
    raw: dict[str, Any] = {"runs": runs}
    rows: list[dict] = []
    parts = {
        "cost": lambda: cost_vs_slices(sizes, runs, args.cost_rule),
        "stages": lambda: stages(100 if args.quick else 400, runs),
        "platform": lambda: platform_bench(
            latency_slices=args.latency_slices or (100 if args.quick else 400),
            latency_runs=runs,
            studies=0
            if "throughput" in args.skip
            else args.studies or (4 if args.quick else STREAM_STUDIES),
            stream_slices=args.stream_slices or (50 if args.quick else 100),
            fetch_runs=0 if "fetch" in args.skip else runs,
        ),
    }
    to_rows = {"cost": _cost_rows, "stages": _stage_rows, "platform": platform_rows}
    for name, fn in parts.items():
        if name in args.skip:
            continue
        try:
            raw[name] = fn()
        except Exception as e:  # noqa: BLE001  (one part failing must not lose the others)
            raw[name] = {"error": f"{type(e).__name__}: {str(e).strip()[-300:]}"}
            print(f"  {name}: not measured: {raw[name]['error']}", flush=True)
            if name != "platform":
                rows.append(row(f"e2e.{name}", name, None, "", detail=raw[name]["error"]))
                continue
        rows += to_rows[name](raw[name], cmd)
    rows += _carried(args.skip, rows)
    print_result(write_result("e2e", rows, raw, cmd))


#: The rows each part writes (id prefixes): a part skipped keeps its rows of the previous result.
PART_ROWS = {
    "cost": ("e2e.cost", "e2e.rss_ratio."),
    "stages": ("e2e.stage",),
    "throughput": ("e2e.throughput",),
    "fetch": ("e2e.fetch_vs_curl", "e2e.archive_vs_fetch"),
}


def _carried(skipped: list[str], rows: list[dict]) -> list[dict]:
    """Rows of the skipped parts from the previous ``e2e.json``, saying when they were measured
    (a partial run must not make the other figures disappear from BENCHMARKS.md)."""
    try:
        prev = json.loads((RESULTS / "e2e.json").read_text())
    except (OSError, ValueError):
        return []
    have = {r["id"] for r in rows}
    prefixes = tuple(pre for part in skipped for pre in PART_ROWS.get(part, ()))
    out = []
    for r in prev.get("rows", []):
        if r["id"] in have or not r["id"].startswith(prefixes) or not prefixes:
            continue
        when = r.get("measured") or prev.get("date", "?")
        note = f"measured {when}, not in this run"
        detail = r["detail"] if note in r["detail"] else f"{r['detail']} ({note})".lstrip()
        out.append({**r, "measured": when, "detail": detail})
    return out


if __name__ == "__main__":
    main()
