"""Two worker hosts: throughput adds up and fairness holds across them (issue 13, item 6).

A *host* is one ``celery -A tasks worker -c 1 -n hostK@%h`` process with its own ``SPRIM_HOME``
(its own work folders). Each configuration (one host; two hosts) runs in its own child process
on fresh shared services: an Orthanc (DICOMweb; the archive jobs fetch from and store to), a
private RabbitMQ vhost and a PostgreSQL database (the job store every host shares), with
``SPRIM_DISPATCH_WINDOW`` = the configuration's pool processes.

Load, identical in both configurations: ``--studies`` synthetic CTs of ``--slices`` slices
(default 10 x 100; the default CT rules make 3 jobs each). All but two come from ``SITE BURST``
at once; when the burst's jobs run, two studies of ``SITE OTHER`` follow. Before it, two small
studies per host warm every pool process (imports; not measured).

Figures: throughput (studies/h from the first submission to the last output stored), the
ratio two hosts / one host (target >= 1.6 on 2 cores shared with Orthanc, RabbitMQ and
PostgreSQL), jobs and busy seconds per host, and for ``SITE OTHER``'s first job: burst jobs that
started between its submission and its start (the job store's fairness: at most one per slot)
and the host that ran it.

Run: ``.venv/bin/python -m bench.bench_hosts [--studies 10] [--slices 100] [--rounds 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BIN,
    RESULTS,
    ROOT,
    command_line,
    env,
    machine,
    print_result,
    row,
    storescu,
    study_uid_of,
    synthetic_series,
    write_result,
)

FINAL = {"done", "partial", "failed", "cancelled", "no_match"}
TARGET_RATIO = 1.6


def _wait(pred: Any, timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timeout waiting for {what}")
        time.sleep(step)


TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds of a process and the children it waited for (/proc/PID/stat)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in f[11:15]) / TICK  # utime stime cutime cstime


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (a worker and its pool processes)."""
    total = cpu_s(pid)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    total += cpu_s(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return total


def machine_busy_s() -> float:
    """Busy core-seconds of the whole machine since boot (/proc/stat: all but idle, iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / TICK


class Host:
    """One worker host: a Celery worker process, 1..n pool processes, its own SPRIM_HOME."""

    def __init__(self, name: str, root: Path, base_env: dict[str, str], concurrency: int) -> None:
        self.name = name
        self.home = root / name
        self.log = root / f"{name}.log"
        e = {**base_env, "SPRIM_HOME": str(self.home)}
        out = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(BIN / "celery"), "-A", "tasks", "worker", "-c", str(concurrency), "-l", "info",
             "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=e, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
        )  # fmt: skip

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
        return b"ready." in self.log.read_bytes()

    def started_jobs(self) -> set[int]:
        """Ids of the jobs this host started (its log: ``job=N event=started``)."""
        text = self.log.read_text(errors="replace")
        return {int(m) for m in re.findall(r"job=(\d+) event=started", text)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)  # warm shutdown: every job is final by now
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)  # the worker's own group: main + pool processes
                self.proc.wait()


def run_config(hosts: int, concurrency: int, folders: list[Path], warm: list[Path],
               root: Path) -> dict[str, Any]:  # fmt: skip
    """One configuration on fresh services (call in a fresh process: it sets SPRIM_*)."""
    from tests.harness.orthanc import OrthancServer
    from tests.platform_kit import drop_pg_db, drop_vhost, make_pg_db, make_vhost

    pg = make_pg_db()
    if pg is None:
        return {"error": "PostgreSQL not reachable on 127.0.0.1:5432"}
    vhost = make_vhost()
    orthanc = OrthancServer(root / "orthanc")
    fleet: list[Host] = []
    try:
        orthanc.start()
        base = env(
            SPRIM_BROKER_URL=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            SPRIM_JOB_STORE_URL=pg,
            SPRIM_ARCHIVE_URL=orthanc.dicomweb_url,
            SPRIM_DISPATCH_WINDOW=str(hosts * concurrency),  # = every pool process of the fleet
        )
        os.environ.update({k: v for k, v in base.items() if k.startswith("SPRIM_")})
        os.environ["SPRIM_HOME"] = str(root / "submitter")
        send_s = storescu(orthanc, [*warm, *folders])
        fleet = [Host(f"host{k + 1}", root, base, concurrency) for k in range(hosts)]
        _wait(lambda: all(h.ready() for h in fleet), 120, "workers ready")

        from tasks.celery_dispatcher import CeleryDispatcher
        from workers.platform.dispatcher import set_dispatcher
        from workers.platform.jobstore import open_store
        from workers.platform.submission import archive_for, submit_study

        set_dispatcher(CeleryDispatcher())
        store = open_store()
        archive = archive_for(orthanc.dicomweb_url)

        def final(ids: set[int]) -> list:  # one query a poll: the submitter stays light
            jobs = [j for j in store.list(limit=100_000) if j.id in ids]
            return jobs if len(jobs) == len(ids) and all(j.state in FINAL for j in jobs) else []

        warm_ids = {j.id for f in warm for j in
                    submit_study(study_uid_of(f), archive, {"institution": "WARM-UP"})}  # fmt: skip
        _wait(lambda: final(warm_ids), 600, "warm-up jobs")

        burst, other = folders[:-2], folders[-2:]
        me = os.getpid()
        cpu0 = {h.name: tree_cpu_s(h.proc.pid) for h in fleet}
        cpu0 |= {
            "orthanc": cpu_s(orthanc.proc.pid),
            "submitter": cpu_s(me),
            "machine": machine_busy_s(),
        }
        t0 = time.time()
        burst_jobs = [j for f in burst for j in
                      submit_study(study_uid_of(f), archive, {"institution": "SITE BURST"})]  # fmt: skip
        burst_ids = {j.id for j in burst_jobs}
        slots = hosts * concurrency
        _wait(lambda: sum(j.id in burst_ids for j in store.list(state="running")) >= slots,
              120, "burst running", 0.05)  # fmt: skip
        other_jobs = [j for f in other for j in
                      submit_study(study_uid_of(f), archive, {"institution": "SITE OTHER"})]  # fmt: skip
        ids = burst_ids | {j.id for j in other_jobs}
        jobs = _wait(lambda: final(ids), 1800, "all jobs final", 0.5)
        t_end = max(j.finished_at or 0 for j in jobs)
        cpu1 = {h.name: tree_cpu_s(h.proc.pid) for h in fleet}
        cpu1 |= {
            "orthanc": cpu_s(orthanc.proc.pid),
            "submitter": cpu_s(me),
            "machine": machine_busy_s(),
        }
        cpu = {k: round(cpu1[k] - cpu0[k], 1) for k in cpu0}
        # PostgreSQL, RabbitMQ and whatever else ran on the machine meanwhile
        cpu["rest"] = round(cpu["machine"] - sum(v for k, v in cpu.items() if k != "machine"), 1)
        by_id = {j.id: j for j in jobs}
        where = {i: h.name for h in fleet for i in h.started_jobs()}
        first = min((by_id[j.id] for j in other_jobs), key=lambda j: (-j.priority, j.id))
        ahead = [j for j in jobs if j.id in burst_ids and j.started_at
                 and first.created_at < j.started_at < first.started_at]  # fmt: skip
        per_host = {}
        for h in fleet:
            mine = [j for j in jobs if where.get(j.id) == h.name]
            per_host[h.name] = {
                "jobs": len(mine),
                "busy_s": round(sum(j.finished_at - j.started_at for j in mine), 1),
            }
        bad = [j for j in jobs if j.state != "done"]
        log_tail = ""
        if bad:  # the worker log says why (the job store keeps the sentence only)
            text = "\n".join(h.log.read_text(errors="replace") for h in fleet)
            at = text.find("Traceback")
            log_tail = text[at : at + 4000] if at >= 0 else text[-2000:]
        stages: dict[str, float] = {}
        for j in jobs:
            for k, v in (j.timings or {}).items():
                stages[k] = stages.get(k, 0.0) + v
        rules: dict[str, list[float]] = {}
        for j in jobs:
            rules.setdefault(j.rule or "", []).append(j.finished_at - j.started_at)
        return {
            "hosts": hosts,
            "concurrency": concurrency,
            "studies": len(folders),
            "jobs": len(jobs),
            "states": sorted({j.state for j in jobs}),
            "errors": [j.error for j in jobs if j.error][:3],
            "send_s": round(send_s, 2),
            "seconds": round(t_end - t0, 2),
            "studies_per_hour": len(folders) / (t_end - t0) * 3600.0,
            "per_host": per_host,
            "cpu_s": cpu,  # over the measured window (time.time() from t0 to now, ~ seconds)
            "window_s": round(time.time() - t0, 1),
            "job_s_by_rule": {r: round(statistics.median(v), 2) for r, v in rules.items()},
            "stage_s": {k: round(v, 1) for k, v in stages.items()},  # summed over the jobs
            "other_first_job": {
                "rule": first.rule,
                "host": where.get(first.id),
                "wait_s": round(first.started_at - first.created_at, 2),
                "burst_jobs_started_before_it": len(ahead),
                "bound": slots,
            },
            "other_hosts": sorted({where.get(j.id, "?") for j in other_jobs}),
            "load_avg": [round(x, 2) for x in os.getloadavg()],
            "log_tail": log_tail,
        }
    finally:
        for h in fleet:
            h.stop()
        orthanc.close()
        drop_pg_db(pg)
        drop_vhost(vhost)


def _child(hosts: int, concurrency: int, studies: int, slices: int) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter (settings, dispatcher, store: its own)."""
    code = (
        "import json, sys; from bench.bench_hosts import _in_child; "
        "print(json.dumps(_in_child(*map(int, sys.argv[1:]))))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(hosts), str(concurrency), str(studies), str(slices)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1][:400]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _in_child(hosts: int, concurrency: int, studies: int, slices: int) -> dict[str, Any]:
    folders = [synthetic_series(slices, seed=2000 + i) for i in range(studies)]
    warm = [synthetic_series(24, seed=2900 + i) for i in range(2 * hosts)]
    with tempfile.TemporaryDirectory(prefix=f"sprim-bench-hosts{hosts}-") as tmp:
        return run_config(hosts, concurrency, folders, warm, Path(tmp))


def _cpu_text(res: dict[str, Any]) -> str:
    """Where the machine's CPU went during a configuration's measured window."""
    c, w = res["cpu_s"], res["window_s"]
    hosts = sum(v for k, v in c.items() if k.startswith("host"))
    return (f"{res['hosts']} host(s) CPU over {w:.0f} s: workers {hosts / w:.2f} cores, Orthanc "
            f"{c['orthanc'] / w:.2f}, submitter {c['submitter'] / w:.2f}, the rest (PostgreSQL, "
            f"RabbitMQ, other work on the machine) {c['rest'] / w:.2f}; load average "
            f"{res['load_avg'][0]:.1f}")  # fmt: skip


def _ceiling_text(one: dict[str, Any], two: dict[str, Any]) -> str:
    """What the 2 cores allow: CPU per study (workers + Orthanc) against the cores left."""
    c = one["cpu_s"]
    ours = sum(v for k, v in c.items() if k.startswith("host")) + c["orthanc"] + c["submitter"]
    per_study = ours / one["studies"]
    left = max(0.0, (os.cpu_count() or 2) - two["cpu_s"]["rest"] / two["window_s"])
    ceiling = left / per_study * 3600.0
    return (f"CPU per study {per_study:.1f} core-s (workers + Orthanc + submitter, one-host run); "
            f"the cores other work left during the two-host run ({left:.2f}) allow "
            f"{ceiling:.0f} studies/h = {ceiling / one['studies_per_hour']:.2f}x one host")  # fmt: skip


def _ours(res: dict[str, Any]) -> float:
    """Cores the configuration's own processes (workers, Orthanc, submitter) received."""
    c = res["cpu_s"]
    return (sum(v for k, v in c.items() if k.startswith("host")) + c["orthanc"]
            + c["submitter"]) / res["window_s"]  # fmt: skip


def rows_of(rounds: list[dict], studies: int, slices: int, cmd: str) -> list[dict]:
    """The reported figures of the rounds run (median-low ratio; its round's details)."""
    ok = [r for r in rounds if "error" not in r["one"] and "error" not in r["two"]]
    rows = []
    what = (f"throughput, two worker hosts (concurrency 1 each) / one host (concurrency 1), "
            f"{studies} studies of {slices} slices")  # fmt: skip
    if not ok:
        err = next(r[k]["error"] for r in rounds for k in ("one", "two") if "error" in r[k])
        return [row("hosts.ratio", what, None, "x", target=TARGET_RATIO, op=">=", detail=err,
                    command=cmd)]  # fmt: skip
    ratios = [r["two"]["studies_per_hour"] / r["one"]["studies_per_hour"] for r in ok]
    best = ok[ratios.index(statistics.median_low(ratios))]  # even count: the lower
    one, two = best["one"], best["two"]
    ratio = two["studies_per_hour"] / one["studies_per_hour"]
    hosts_detail = ", ".join(f"{k} {v['jobs']} jobs, busy {v['busy_s'] / two['seconds']:.0%}"
                             for k, v in two["per_host"].items())  # fmt: skip
    busy = [r[k]["cpu_s"]["machine"] / r[k]["window_s"] for r in ok for k in ("one", "two")]
    rows.append(row(
        "hosts.ratio", what, ratio, "x", target=TARGET_RATIO, op=">=",
        detail=f"one host {one['studies_per_hour']:.0f} studies/h ({one['seconds']:.0f} s), "
        f"two hosts {two['studies_per_hour']:.0f} studies/h ({two['seconds']:.0f} s: "
        f"{hosts_detail}); ratios of {len(ok)} round(s) {', '.join(f'{x:.2f}' for x in ratios)} "
        f"while the machine was {min(busy):.2f}–{max(busy):.2f} of {os.cpu_count()} cores busy; "
        f"{_ceiling_text(one, two)}; {_cpu_text(one)}; {_cpu_text(two)}", command=cmd,
    ))  # fmt: skip
    per_core = [(r["two"]["studies_per_hour"] / _ours(r["two"]))
                / (r["one"]["studies_per_hour"] / _ours(r["one"])) for r in ok]  # fmt: skip
    cps = [(k, r[k]["cpu_s"], r[k]["studies"]) for r in ok for k in ("one", "two")]
    got = {k: ", ".join(f"{_ours(r[k]):.2f}" for r in ok) for k in ("one", "two")}
    per_study = {k: [(sum(v for n, v in c.items() if n.startswith("host")) + c["orthanc"]
                      + c["submitter"]) / n for kk, c, n in cps if kk == k]
                 for k in ("one", "two")}  # fmt: skip
    rows.append(row(
        "hosts.per_core", "two hosts / one host: throughput per core the configuration's own "
        "processes received (1 = a second host adds no cost per study)",
        statistics.median(per_core), "x", detail=f"rounds {', '.join(f'{x:.2f}' for x in per_core)}"
        f"; CPU per study (workers + Orthanc + submitter): one host "
        f"{', '.join(f'{x:.1f}' for x in per_study['one'])} core-s, two hosts "
        f"{', '.join(f'{x:.1f}' for x in per_study['two'])} core-s; cores received: one host "
        f"{got['one']}, two hosts {got['two']}", command=cmd,
    ))  # fmt: skip
    for key, res in (("one", one), ("two", two)):
        rows.append(row(
            f"hosts.throughput.{key}", f"throughput, {res['hosts']} host(s) x concurrency "
            f"{res['concurrency']} (Orthanc, RabbitMQ, PostgreSQL shared)",
            res["studies_per_hour"], "studies/h", detail=f"{res['jobs']} jobs "
            f"{'/'.join(res['states'])} in {res['seconds']:.0f} s; median job s by rule "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(res["job_s_by_rule"].items()))
            + f"; of the jobs' {sum(res['stage_s'].values()):.0f} s, fetch + store (Orthanc) "
            f"{res['stage_s'].get('fetch', 0) + res['stage_s'].get('store', 0):.0f} s",
            command=cmd,
        ))  # fmt: skip
    fo = two["other_first_job"]
    ahead = [r["two"]["other_first_job"]["burst_jobs_started_before_it"] for r in ok]
    rows.append(row(
        "hosts.fairness", "two hosts: burst jobs started between another site's submission "
        "and its first job's start", max(ahead), "jobs",
        target=float(fo["bound"]), op="<=", detail=f"every round: {ahead}; its {fo['rule']} "
        f"job waited {fo['wait_s']:.1f} s and ran on {fo['host']}; that site's jobs ran on "
        f"{', '.join(two['other_hosts'])}; one host: "
        f"{one['other_first_job']['burst_jobs_started_before_it']} (bound "
        f"{one['other_first_job']['bound']})", command=cmd,
    ))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=10)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1, help="pairs (one host, two hosts) to run")
    ap.add_argument("--quick", action="store_true", help="6 studies of 50 slices, one round")
    ap.add_argument("--rows-only", action="store_true",
                    help="recompute the figures of bench/results/hosts.json from its raw rounds")  # fmt: skip
    a = ap.parse_args()
    if a.rows_only:
        path = RESULTS / "hosts.json"
        doc = json.loads(path.read_text())
        raw = doc["raw"]
        doc["rows"] = rows_of(raw["rounds"], raw["studies"], raw["slices"], doc["command"])
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print_result(path)
        return
    if a.quick:
        a.studies, a.slices, a.rounds = 6, 50, 1
    from tests.harness.orthanc import orthanc_available

    cmd = command_line("bench.bench_hosts")
    if not orthanc_available():
        print("Orthanc + DICOMweb plugin not installed", file=sys.stderr)
        sys.exit(1)
    for i in range(a.studies):  # data first: generation is not part of the run
        synthetic_series(a.slices, seed=2000 + i)
    rounds = []
    for k in range(a.rounds):
        # alternate the order: a trend in the machine's other load favours neither
        if k % 2:
            two = _child(2, 1, a.studies, a.slices)
            one = _child(1, 1, a.studies, a.slices)
        else:
            one = _child(1, 1, a.studies, a.slices)
            two = _child(2, 1, a.studies, a.slices)
        print(json.dumps({"one": one, "two": two}, indent=1), flush=True)
        rounds.append({"one": one, "two": two})
    raw = {"rounds": rounds, "studies": a.studies, "slices": a.slices, "machine": machine()}
    path = write_result("hosts", rows_of(rounds, a.studies, a.slices, cmd), raw, cmd)
    print_result(path)


if __name__ == "__main__":
    main()
