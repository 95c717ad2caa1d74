"""The archive loop: ingest, fetch and write-back figures against real Orthanc and dcmtk.

For a synthetic 400 x 512² CT (``bench.synthetic``), in one run:

1. **Receive**: ``storescu`` of the 400 files to ``sprim listen`` (a separate process, durable
   store: fsync before success) next to dcmtk ``storescp`` (the floor) — target ≤ 2x.
2. **Fetch**: WADO-RS of the series from Orthanc by :class:`DicomWebArchive` (streamed to a
   job folder) next to a raw streamed WADO-RS read (the HTTP floor, bytes to /dev/null) and
   Orthanc's own ``/series/{id}/archive`` zip download.
3. **Loop latency**: Orthanc (StableAge 2 s = the quiet period) + ``sprim watch`` + a Celery
   worker on a private RabbitMQ vhost, rule = MPR; clock from the last instance stored in
   Orthanc (``storescu`` returned: every C-STORE acknowledged) to every output of the MPR job
   present in Orthanc; the job's own timings (fetch, read, steps, store) break it down.
4. **Store**: the MPR outputs (``sprim run``) into a fresh Orthanc by STOW-RS, by sprim's
   C-STORE and by dcmtk ``storescu`` (the peer).

Sections skipped with ``--skip`` keep their previous rows in the result file.

Writes ``bench/results/archive.json``. Run:
``.venv/bin/python -m bench.bench_archive [--runs 3] [--slices 400] [--skip loop]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.common import ROOT, command_line, env, row, series_mb, synthetic_series, write_result
from tests.harness.orthanc import OrthancServer, free_port, send

BIN = Path(sys.executable).parent
RULES = """\
rules:
  - name: bench-ct-mpr
    match:
      Modality: {in: [CT]}
    select_series:
      where:
        NumberOfSeriesRelatedInstances: {gte: 20}
      prefer: thinnest
    run:
      - {use: reformat.mpr}
"""


def _med(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def _wait_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not open")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


# -- 1. receive ----------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def receive(series: Path, runs: int, tmp: Path) -> dict:
    files = sorted(series.glob("*.dcm"))
    out: dict[str, list[float]] = {"storescp": [], "sprim_listen": [], "sprim_listen_nofsync": []}
    cpu: dict[str, list[float]] = {k: [] for k in out}
    for i in range(runs):
        for name in out:
            port = free_port()
            store = tmp / f"recv-{name}-{i}"
            store.mkdir(parents=True)
            if name == "storescp":
                cmd = ["storescp", "-aet", "SPRIM", "-od", str(store), str(port)]
            else:
                cmd = [str(BIN / "sprim"), "listen", "--port", str(port), "--host", "127.0.0.1",
                       "--store", str(store), "--quiet", "3600", "--allow", "BENCH"]  # fmt: skip
                if name.endswith("nofsync"):
                    cmd.append("--no-fsync")
            e = env(SPRIM_HOME=str(tmp / "home-recv"))
            p = subprocess.Popen(
                cmd,
                env=e,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                _wait_port(port, 60)
                c0, t0 = _cpu_s(p.pid), time.perf_counter()
                send(files, "127.0.0.1", port, called="SPRIM", calling="BENCH")
                out[name].append(time.perf_counter() - t0)
                cpu[name].append(_cpu_s(p.pid) - c0)  # the receiver's own work, load aside
            finally:
                _stop(p)
            n = sum(1 for f in store.rglob("*") if f.is_file() and not f.name.startswith("."))
            assert n == len(files), f"{name}: {n} of {len(files)} files stored"
            shutil.rmtree(store)
    return {k: _med(v) for k, v in out.items()} | {f"{k}_cpu": _med(v) for k, v in cpu.items()}


# -- 2. fetch ------------------------------------------------------------------------------------
def fetch(orthanc: OrthancServer, study: str, series_uid: str, mb: float, runs: int, tmp: Path):
    from workers.archives.dicomweb import DicomWebArchive

    archive = DicomWebArchive(orthanc.dicomweb_url)
    res: dict[str, list[float]] = {"dicomweb_archive": [], "wado_raw_stream": [], "orthanc_zip": []}
    url = f"{orthanc.dicomweb_url}/studies/{study}/series/{series_uid}"
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    oid = requests.post(orthanc.url + "/tools/lookup", data=series_uid, timeout=30).json()[0]["ID"]
    for i in range(runs):
        dest = tmp / f"fetch-{i}"
        t0 = time.perf_counter()
        archive.fetch_series(study, series_uid, dest)
        res["dicomweb_archive"].append(time.perf_counter() - t0)
        shutil.rmtree(dest)
        t0 = time.perf_counter()
        with requests.get(url, headers=accept, stream=True, timeout=120) as r:
            r.raise_for_status()
            for _ in r.iter_content(1 << 20):
                pass
        res["wado_raw_stream"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()  # CPU-bound deflate in Orthanc: once
    with requests.get(f"{orthanc.url}/series/{oid}/archive", stream=True, timeout=600) as r:
        r.raise_for_status()
        for _ in r.iter_content(1 << 20):
            pass
    res["orthanc_zip"].append(time.perf_counter() - t0)
    return {k: {**_med(v), "mb_s": mb / statistics.median(v)} for k, v in res.items()}


# -- 3. loop latency ------------------------------------------------------------------------------
def loop_latency(series_list: list[Path], tmp: Path) -> dict:
    from tests.platform_kit import drop_vhost, make_vhost, rabbit_ready
    from workers.platform.jobstore import JobStore

    if not rabbit_ready():
        return {"skipped": "RabbitMQ not running on 127.0.0.1:5672"}
    orthanc = OrthancServer(
        tmp / "orthanc-loop", stable_age=2, in_memory=False, sync_storage=True
    ).start()
    vhost = make_vhost()
    rules = tmp / "rules.yaml"
    rules.write_text(RULES)
    store_url = f"sqlite:///{tmp / 'loop-jobs.db'}"
    e = env(
        SPRIM_HOME=str(tmp / "home-loop"),
        SPRIM_BROKER_URL=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
        SPRIM_JOB_STORE_URL=store_url,
        SPRIM_ARCHIVE_URL=orthanc.dicomweb_url,
        SPRIM_RULES_FILE=str(rules),
    )
    procs = []
    runs = []
    try:
        for name, cmd, ready in (
            ("worker", [str(BIN / "celery"), "-A", "tasks", "worker", "-l", "info", "-c", "1",
                        "--without-gossip", "--without-mingle", "--without-heartbeat"], b"ready."),
            ("watch", [str(BIN / "sprim"), "watch", "--url", orthanc.url, "--interval", "0.1"],
             b"event=watch_started"),
        ):  # fmt: skip
            log = tmp / f"loop-{name}.log"
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=e,
                    stdout=open(log, "ab"),  # noqa: SIM115
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
            deadline = time.monotonic() + 60
            while ready not in log.read_bytes():
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        store = JobStore(store_url)
        for series in series_list:
            import pydicom

            first = sorted(series.glob("*.dcm"))[0]
            study = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
            t_send = time.perf_counter()
            send(series, "127.0.0.1", orthanc.dicom_port, called=orthanc.aet, calling="BENCH")
            t_stored = time.perf_counter()
            job = None
            while time.perf_counter() - t_stored < 600:
                try:
                    jobs = [j for j in store.list(study_uid=study) if j.state in ("done", "failed")]
                except Exception:  # noqa: BLE001  (schema not yet created)
                    jobs = []
                if jobs:
                    job = jobs[0]
                    break
                time.sleep(0.05)
            t_done = time.perf_counter()
            if job is None or job.state != "done":
                runs.append({"error": getattr(job, "error", "timeout")})
                continue
            want = {o["series_uid"]: len(o["instances"]) for o in job.outputs}
            present = {
                s["MainDicomTags"]["SeriesInstanceUID"]: len(s["Instances"])
                for s in orthanc.series_of_study(study)
                if s["MainDicomTags"]["SeriesInstanceUID"] in want
            }
            assert present == want, (present, want)
            runs.append({
                "send_s": t_stored - t_send,
                "stored_to_outputs_in_orthanc_s": t_done - t_stored,
                "outputs": sum(want.values()),
                "job_timings": job.timings,
                "attempts": job.attempts,
            })  # fmt: skip
        store.dispose()
    finally:
        for p in procs:
            _stop(p)
        orthanc.close()
        drop_vhost(vhost)
    ok = [r["stored_to_outputs_in_orthanc_s"] for r in runs if "error" not in r]
    return {"runs": runs, "latency": _med(ok) if ok else None, "stable_age_s": 2}


# -- 4. store peers ------------------------------------------------------------------------------
def store_peers(series: Path, tmp: Path) -> dict:
    """The MPR rule's outputs (written by ``sprim run``) into a fresh Orthanc three ways."""
    from workers.archives.dicomweb import DicomWebArchive
    from workers.archives.dimse import DimseArchive

    rules = tmp / "rules-store.yaml"
    rules.write_text(RULES)
    out = tmp / "mpr-out"
    r = subprocess.run(
        [str(BIN / "sprim"), "run", str(series), "--out", str(out), "--rules", str(rules)],
        env=env(SPRIM_HOME=str(tmp / "home-store")), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    files = sorted(out.rglob("*.dcm"))
    if r.returncode != 0 or not files:
        return {"skipped": f"sprim run failed: {r.stdout[-500:]} {r.stderr[-500:]}"}
    res: dict = {"files": len(files), "mb": sum(f.stat().st_size for f in files) / 1e6}
    for name in ("stow_rs", "c_store_sprim", "storescu"):
        with OrthancServer(tmp / f"orthanc-store-{name}", in_memory=False, sync_storage=True) as o:
            t0 = time.perf_counter()
            if name == "stow_rs":
                DicomWebArchive(o.dicomweb_url).store(files)
            elif name == "c_store_sprim":
                DimseArchive(o.aet, "127.0.0.1", o.dicom_port).store(files)
            else:
                send(files, "127.0.0.1", o.dicom_port, called=o.aet, calling="BENCH")
            res[name] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--skip", nargs="*", default=[], choices=["receive", "fetch", "loop", "store"])
    a = ap.parse_args(argv)
    cmd = command_line("bench.bench_archive") + (f" --runs {a.runs}" if a.runs != 3 else "")
    series = synthetic_series(a.slices, seed=0)
    mb = series_mb(series)
    raw: dict = {"slices": a.slices, "series_mb": mb}
    rows = []
    with tempfile.TemporaryDirectory(prefix="sprim-bench-archive-") as t:
        tmp = Path(t)
        if "receive" not in a.skip:
            r = raw["receive"] = receive(series, a.runs, tmp)
            ratio = r["sprim_listen"]["median"] / r["storescp"]["median"]
            rows += [
                row("archive.recv.storescp", f"storescu -> dcmtk storescp, {a.slices} files", r["storescp"]["median"], "s", command=cmd),
                row("archive.recv.listen", f"storescu -> sprim listen (fsync per instance), {a.slices} files", r["sprim_listen"]["median"], "s", command=cmd),
                row("archive.recv.ratio", "sprim listen / storescp", ratio, "x", target=2.0, detail=f"{a.slices} files, median of {a.runs}: sprim listen {r['sprim_listen']['median']:.2f} s (runs {[round(x, 2) for x in r['sprim_listen']['runs']]}), storescp {r['storescp']['median']:.2f} s (runs {[round(x, 2) for x in r['storescp']['runs']]}); not durable (--no-fsync) {r['sprim_listen_nofsync']['median']:.2f} s = {r['sprim_listen_nofsync']['median'] / r['storescp']['median']:.2f}x; receiver CPU {r['sprim_listen_cpu']['median']:.2f} s vs storescp {r['storescp_cpu']['median']:.2f} s; load average {os.getloadavg()[0]:.1f} on 2 cores", command=cmd),
                row("archive.recv.listen_nofsync", f"storescu -> sprim listen --no-fsync (not durable: what the protocol, the header check and the write cost), {a.slices} files", r["sprim_listen_nofsync"]["median"], "s", command=cmd),
                row("archive.recv.cpu_ratio", f"receiver CPU time, sprim listen / storescp, {a.slices} files (user + system of the server process during the send: what the load on the shared cores does not inflate)", r["sprim_listen_cpu"]["median"] / max(r["storescp_cpu"]["median"], 0.01), "x", detail=f"sprim listen {r['sprim_listen_cpu']['median']:.2f} s, --no-fsync {r['sprim_listen_nofsync_cpu']['median']:.2f} s, storescp {r['storescp_cpu']['median']:.2f} s CPU; load average {os.getloadavg()[0]:.1f} on 2 cores", command=cmd),
            ]  # fmt: skip
            print(f"receive: storescp {r['storescp']['median']:.2f} s, sprim listen "
                  f"{r['sprim_listen']['median']:.2f} s ({ratio:.2f}x)")  # fmt: skip
        if "fetch" not in a.skip:
            with OrthancServer(
                tmp / "orthanc-fetch", stable_age=2, in_memory=False, sync_storage=True
            ) as orthanc:
                t0 = time.perf_counter()
                send(series, "127.0.0.1", orthanc.dicom_port, called=orthanc.aet, calling="BENCH")
                raw["storescu_to_orthanc_s"] = time.perf_counter() - t0
                s = orthanc.get("/series?expand").json()[0]
                study = orthanc.get(f"/studies/{s['ParentStudy']}").json()["MainDicomTags"][
                    "StudyInstanceUID"
                ]
                f = raw["fetch"] = fetch(
                    orthanc, study, s["MainDicomTags"]["SeriesInstanceUID"], mb, a.runs, tmp
                )
            rows += [
                row("archive.fetch.dicomweb", "WADO-RS fetch to job folder (DicomWebArchive, streamed)", f["dicomweb_archive"]["mb_s"], "MB/s", op=">=", command=cmd),
                row("archive.fetch.raw", "WADO-RS raw stream (HTTP floor)", f["wado_raw_stream"]["mb_s"], "MB/s", op=">=", command=cmd),
                row("archive.fetch.zip", "Orthanc /series/{id}/archive zip", f["orthanc_zip"]["mb_s"], "MB/s", op=">=", command=cmd),
                row("archive.store.storescu_orthanc", f"storescu -> Orthanc, {a.slices} files", raw["storescu_to_orthanc_s"], "s", command=cmd),
            ]  # fmt: skip
            print("fetch MB/s: " + ", ".join(f"{k} {v['mb_s']:.0f}" for k, v in f.items()))
        if "loop" not in a.skip:
            lst = [series] + [synthetic_series(a.slices, seed=s) for s in range(1, a.runs)]
            lo = raw["loop"] = loop_latency(lst, tmp)
            lat = (lo.get("latency") or {}).get("median")
            rows.append(row("archive.loop.latency", f"last instance in Orthanc -> all MPR outputs in Orthanc ({a.slices} slices, StableAge 2 s)", lat, "s", detail=lo.get("skipped", ""), command=cmd))  # fmt: skip
            print(f"loop: {lo.get('latency')} {lo.get('skipped', '')}")
        if "store" not in a.skip:
            st = raw["store"] = store_peers(series, tmp)
            if "skipped" not in st:
                what = f"{st['files']} MPR outputs ({st['mb']:.0f} MB) into Orthanc"
                rows += [
                    row("archive.store.stow", f"{what}: STOW-RS (DicomWebArchive)", st["stow_rs"], "s", command=cmd),
                    row("archive.store.cstore", f"{what}: C-STORE (DimseArchive)", st["c_store_sprim"], "s", command=cmd),
                    row("archive.store.storescu", f"{what}: dcmtk storescu (peer)", st["storescu"], "s", command=cmd),
                ]  # fmt: skip
            print(f"store: {st}")
    path = write_result("archive", _merge(rows), {**_previous().get("raw", {}), **raw}, cmd)
    print(f"wrote {path}")


def _previous() -> dict:
    from bench.common import RESULTS

    try:
        return json.loads((RESULTS / "archive.json").read_text())
    except (OSError, ValueError):
        return {}


def _merge(rows: list[dict]) -> list[dict]:
    """Rows of this run, plus the previous run's rows for sections skipped now."""
    new = {r["id"] for r in rows}
    return [r for r in _previous().get("rows", []) if r["id"] not in new] + rows


if __name__ == "__main__":
    main()
