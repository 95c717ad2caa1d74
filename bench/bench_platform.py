"""Platform benchmark (not a test): rule evaluation rate and enqueue-to-start latency.

Run: ``.venv/bin/python bench/bench_platform.py`` (RabbitMQ on 127.0.0.1:5672; a private vhost
is created and deleted). Writes ``bench/results/platform.json``.

- rule evaluation: ``pipelines.rules.route`` over studies of 5 series with a 6-rule set
  (target >= 50,000 series/s);
- enqueue-to-start: a job is released to RabbitMQ (``dispatched_at``) and an idle
  ``celery -A tasks worker`` marks it running (``started_at``); median / p95 over sequential
  jobs (target <= 50 ms); also the round trip of an empty Celery task for reference.
"""

from __future__ import annotations

import json
import os
import platform as pf
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RULES = """
rules:
  - name: ct-chest
    match: {Modality: {in: [CT]}, BodyPartExamined: {in: [CHEST, THORAX]}}
    select_series:
      where: {ImageType: {contains_all: [ORIGINAL, PRIMARY, AXIAL]}, SliceThickness: {lte: 1.5}}
      exclude: {SeriesDescription: {regex: "(?i)scout|localizer|dose"}}
      prefer: thinnest
    run: [{use: reformat.mpr, with: {planes: [coronal, sagittal], thickness_mm: 3}}]
  - name: ct-abdomen
    match: {Modality: {in: [CT]}, BodyPartExamined: {in: [ABDOMEN, PELVIS]}}
    select_series: {where: {SliceThickness: {lte: 3}}, prefer: most_images}
    run: [reformat.mpr]
  - name: ct-head-urgent
    match: {Modality: CT, BodyPartExamined: HEAD, calling_ae: {in: [ER_CT1, ER_CT2]}}
    run: [reformat.mpr]
    priority: urgent
  - name: mr-brain
    match: {Modality: MR, StudyDescription: {regex: "(?i)brain|head"}}
    select_series: {where: {NumberOfSeriesRelatedInstances: {gte: 100}}, prefer: all}
    run: [reformat.mpr]
  - name: site-north
    match: {institution: {eq: NORTH}, Modality: {in: [CT, MR]}, SliceThickness: {exists: true}}
    run: [reformat.mpr]
    priority: low
  - name: pet
    match: {Modality: PT, SeriesDescription: {contains: AC}}
    run: [reformat.mpr]
"""


def _studies(n: int) -> list[list[dict]]:
    import random

    rnd = random.Random(4)
    out = []
    for i in range(n):
        mod = rnd.choice(["CT", "CT", "MR", "PT", "CR"])
        body = rnd.choice(["CHEST", "ABDOMEN", "HEAD", None])
        series = []
        for k in range(5):
            s = {"StudyInstanceUID": f"1.{i}", "SeriesInstanceUID": f"1.{i}.{k}", "Modality": mod,
                 "SeriesDescription": rnd.choice(["AX 1mm", "Scout", "AC WB", "Dose report", "T1 3D"]),
                 "ImageType": ["ORIGINAL", "PRIMARY", rnd.choice(["AXIAL", "LOCALIZER"])],
                 "SliceThickness": rnd.choice([0.625, 1.0, 3.0, 5.0, "odd", None]),
                 "NumberOfSeriesRelatedInstances": rnd.randint(1, 600),
                 "StudyDescription": rnd.choice(["BRAIN", "THORAX", ""])}  # fmt: skip
            if body:
                s["BodyPartExamined"] = body
            series.append(s)
        out.append(series)
    return out


def bench_rules() -> dict:
    from pipelines.rules import load_rules, route

    rs = load_rules(RULES)
    studies = _studies(4000)
    ctx = {"institution": "NORTH", "calling_ae": "ER_CT1", "source": "orthanc"}
    n_series = sum(len(s) for s in studies)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        matched = 0
        for s in studies:
            matched += len(route(rs, s, ctx))
        runs.append(time.perf_counter() - t0)
    best = statistics.median(runs)
    return {"rules": len(rs), "series": n_series, "matches": matched, "seconds_median_of_3": round(best, 4),
            "series_per_s": round(n_series / best), "target_series_per_s": 50000}  # fmt: skip


def bench_latency(n: int = 30) -> dict:
    import subprocess

    from tests.platform_kit import drop_vhost, make_vhost, write_study

    tmp = Path(tempfile.mkdtemp(prefix="sprim-bench-"))
    vhost = make_vhost()
    rules = tmp / "rules.yaml"
    rules.write_text(
        "rules:\n  - name: touch\n    match: {Modality: CT}\n    run: [test.touch]\n    priority: urgent\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPRIM_HOME": str(tmp / "home"),
           "SPRIM_BROKER_URL": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
           "SPRIM_JOB_STORE_URL": f"sqlite:///{tmp / 'jobs.db'}", "SPRIM_RULES_FILE": str(rules),
           "SPRIM_PLUGINS": "tests.platform_kit", "SPRIM_RELEASE_INTERVAL_S": "60"}  # fmt: skip
    os.environ.update({k: v for k, v in env.items() if k.startswith("SPRIM_")})
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115
    w = subprocess.Popen([str(ROOT / ".venv/bin/celery"), "-A", "tasks", "worker", "-l", "info", "-c", "1",
                          "--without-gossip", "--without-mingle"], cwd=ROOT, env=env, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        while b"ready." not in (tmp / "worker.log").read_bytes():
            assert w.poll() is None, (tmp / "worker.log").read_text()
            time.sleep(0.1)
        from tasks.app import app as capp
        from tasks.celery_dispatcher import CeleryDispatcher
        from workers.archives.folder import FolderArchive
        from workers.platform import dispatcher, submission
        from workers.platform.jobstore import open_store

        capp.conf.broker_url = env["SPRIM_BROKER_URL"]
        dispatcher.set_dispatcher(CeleryDispatcher())
        archive = FolderArchive(tmp / "archive", name="bench")
        store = open_store()
        lat, total = [], []
        for i in range(n + 3):
            st, _ = write_study(tmp / "archive" / "in", n_slices=2, size=4)
            [j] = submission.submit_study(st, archive, {})
            while (d := store.get(j.id)).state not in ("done", "failed"):
                time.sleep(0.002)
            if i >= 3:  # warm-up: imports in the pool process
                lat.append(d.started_at - d.dispatched_at)
                total.append(d.finished_at - d.dispatched_at)
        # reference: an empty Celery task round trip on the same worker (release task, nothing to do)
        from tasks.jobs import release

        ping = []
        for _ in range(20):
            t0 = time.perf_counter()
            release.apply_async().id  # noqa: B018
            ping.append(time.perf_counter() - t0)
    finally:
        os.killpg(w.pid, 15)
        w.wait(30)
        drop_vhost(vhost)
    lat.sort()
    return {"jobs": n, "enqueue_to_start_ms_median": round(1000 * statistics.median(lat), 1),
            "enqueue_to_start_ms_p95": round(1000 * lat[int(0.95 * (len(lat) - 1))], 1),
            "enqueue_to_start_ms_max": round(1000 * lat[-1], 1),
            "dispatch_to_done_ms_median": round(1000 * statistics.median(total), 1),
            "publish_ms_median": round(1000 * statistics.median(ping), 2),
            "target_ms": 50}  # fmt: skip


def main() -> None:
    res = {
        "machine": {"python": pf.python_version(), "cpus": os.cpu_count()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    res["rule_evaluation"] = bench_rules()
    print(json.dumps(res["rule_evaluation"]))
    res["enqueue_to_start"] = bench_latency()
    print(json.dumps(res["enqueue_to_start"]))
    out = ROOT / "bench" / "results" / "platform.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
