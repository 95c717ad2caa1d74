"""Discrete-event simulation of the region: how many 2-core worker hosts, and the STAT lane.

``python -m bench.sim [--seed 1] [--days 5] [--hosts 1 2 3 4 5 6] [--write]`` prints the table
(``--write`` also writes ``bench/results/sim.json`` for BENCHMARKS.md). Method, inputs and
results: ``docs/scale.md``.

What is simulated (heapq event loop, seeded, deterministic):

- **Region**: 80 sites (4 large hospitals, 16 general hospitals, 60 outpatient clinics),
  ~3,300 CT studies per weekday needing post-processing, hourly arrival profiles (hospitals
  24 h with peaks mid-morning and early afternoon; clinics in office hours), Poisson arrivals
  within each hour. A study arrives when its last instance is in the archive.
- **Platform semantics** (``workers/platform/jobstore.py`` ``JobStore.release``, docs/platform.md):
  the study is routed ``quiet_s`` after its last instance (Orthanc ``StableAge`` for
  ``sprim watch``, the quiet period for ``sprim listen``; both call ``submit_study``) plus the
  measured route delay; the default CT rules make three jobs (MPR normal, lungs normal, bone
  low; a STAT study's MPR job is urgent). Jobs wait in the store; a release hands out jobs
  until ``SPRIM_DISPATCH_WINDOW`` (= total worker slots) are in flight, in the store's order:
  priority, then the institution's rank (position in its queue + jobs in flight), then the
  institution served least recently, then age. Releases happen on submit and after every job.
  With the window equal to the slots a released job always finds a free pool process, so the
  broker never holds a queue (measured enqueue-to-start added).
- **Costs** (measured, ``bench/results/e2e.json``): each stage's worker time per study at
  100 slices (50-study throughput run) and at 400 slices (median of the 400-slice runs), both
  on 2 pool processes sharing 2 cores with Orthanc; linear in slices between and beyond
  (the cost-vs-slices fit of the same file has R² 0.998 from 100 to 800). Steps belong to the
  rule that runs them; fetch and read are paid by every job (each job fetches and reads the
  series); store is split by the objects each rule stores.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PRIORITY = {"urgent": 2, "normal": 1, "low": 0}  # pipelines.rules priority levels

#: The default CT rules (workers/processing/default_rules.yaml): name, priority, steps.
RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("ct-volume-mpr", "normal", ("reformat.mpr",)),
    ("ct-chest-lungs", "normal", ("segment.lungs", "segment.body", "mesh.surface")),
    ("ct-bone-3d", "low", ("segment.bone", "mesh.surface", "projection.rotating_mip")),
)
#: Objects stored by the lungs and bone jobs (SEG, SR, meshes; 36-view MIP cine + STL);
#: the MPR job stores the rest of a study's measured outputs.
FIXED_OBJECTS = {"ct-chest-lungs": 7, "ct-bone-3d": 37}

# Weekday arrival profiles, relative weight per hour 0..23 (normalised per site).
HOSPITAL_HOURS = (1.0, 0.8, 0.7, 0.7, 0.7, 0.9, 1.5, 3.0, 7.0, 11.0, 12.5, 9.5,
                  6.0, 8.5, 11.0, 9.0, 6.0, 4.0, 3.0, 2.4, 2.0, 1.7, 1.4, 1.2)  # fmt: skip
CLINIC_HOURS = (0, 0, 0, 0, 0, 0, 0, 3.0, 8.0, 12.0, 13.0, 10.0,
                5.0, 10.0, 12.0, 11.0, 8.0, 5.0, 0, 0, 0, 0, 0, 0)  # fmt: skip

#: Site tiers: count, share of the region's studies, hourly profile, share of STAT studies.
TIERS: tuple[tuple[str, int, float, tuple[float, ...], float], ...] = (
    ("large hospital", 4, 0.36, HOSPITAL_HOURS, 0.15),
    ("general hospital", 16, 0.36, HOSPITAL_HOURS, 0.15),
    ("clinic", 60, 0.28, CLINIC_HOURS, 0.0),
)
#: Slices of the CT volume post-processed (thin-slice reconstructions; mean 405).
SLICE_MIX: tuple[tuple[int, float], ...] = ((200, 0.20), (300, 0.25), (400, 0.30),
                                            (600, 0.15), (800, 0.10))  # fmt: skip


# -- measured costs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Costs:
    """Worker seconds per job of each rule, linear in slices, and the platform's delays."""

    at100: dict[str, float]  # rule -> seconds at 100 slices
    at400: dict[str, float]  # rule -> seconds at 400 slices
    route_delay_s: float  # StableStudy -> jobs created (watcher poll + routing)
    enqueue_to_start_s: float  # release -> pool process starts the job
    noise_cv: float  # spread of a study's worker time between identical runs
    sources: dict[str, str] = field(default_factory=dict)

    def job_s(self, rule: str, slices: int) -> float:
        a, b = self.at100[rule], self.at400[rule]
        return max(0.05, a + (b - a) * (slices - 100) / 300.0)


def _rule_split(stages: dict[str, float], mpr_objects: float, all_objects: float
                ) -> dict[str, float]:  # fmt: skip
    """Per-rule worker seconds of one study from its per-stage totals (see module doc)."""
    n = len(RULES)
    per_rule = {}
    mesh_users = sum("mesh.surface" in steps for _, _, steps in RULES)
    objects = {r: FIXED_OBJECTS.get(r, 0.0) for r, _, _ in RULES}
    objects["ct-volume-mpr"] = mpr_objects
    for rule, _, steps in RULES:
        s = (stages.get("fetch", 0.0) + stages.get("read", 0.0)) / n
        for st in steps:  # a step used by two rules (mesh.surface) is split evenly
            s += stages.get(st, 0.0) / (mesh_users if st == "mesh.surface" else 1)
        s += stages.get("store", 0.0) * objects[rule] / all_objects
        per_rule[rule] = s
    return per_rule


class CostsMissing(Exception):
    """``e2e.json`` lacks a figure the simulation needs (a ``--quick`` or partial run)."""


def measured_costs(results: Path = RESULTS) -> Costs:
    """Per-rule job costs from a full run's ``e2e.json``; else those ``sim.json`` recorded from
    the last full one (a ``--quick`` e2e run measures neither the 400-slice study nor 50)."""
    try:
        return costs_from_e2e(results)
    except CostsMissing as e:
        try:
            c = json.loads((results / "sim.json").read_text())["raw"]["costs"]
        except (OSError, KeyError, json.JSONDecodeError):
            raise e from None
        sources = {**c["sources"], "note": f"costs as recorded in sim.json: {e}"}
        return Costs(c["at100"], c["at400"], c["route_delay_s"], c["enqueue_to_start_s"],
                     c["noise_cv"], sources)  # fmt: skip


def costs_from_e2e(results: Path = RESULTS) -> Costs:
    """Per-rule job costs from ``e2e.json``, delays from ``e2e.json`` and ``platform.json``."""
    e2e = json.loads((results / "e2e.json").read_text())
    plat = e2e.get("raw", {}).get("platform", {})
    points = {p["slices"]: p for p in e2e.get("raw", {}).get("cost", {}).get("points", [])}
    lat = [x for x in plat.get("latency", []) if x.get("slices") == 400]
    if "throughput" not in plat or not lat or 100 not in points or 400 not in points:
        raise CostsMissing(f"bench/results/e2e.json ({e2e.get('date')}, "
                           f"{e2e.get('command')}) is not a full run")  # fmt: skip
    th = plat["throughput"]
    n100 = th["studies"]
    stages100 = {k: v / n100 for k, v in th["timings"].items()}
    objects100 = th["outputs"] / n100
    stages400 = {k: statistics.median(x["timings"].get(k, 0.0) for x in lat)
                 for k in lat[0]["timings"]}  # fmt: skip
    objects400 = statistics.median(x["outputs"] for x in lat)
    at100 = _rule_split(stages100, points[100]["objects"], objects100)
    at400 = _rule_split(stages400, points[400]["objects"], objects400)
    per_run = [sum(x["timings"].values()) for x in lat]
    cv = statistics.pstdev(per_run) / statistics.mean(per_run) if len(per_run) > 1 else 0.1
    route = statistics.median(max(0.0, x["route_delay_s"]) for x in lat)
    enqueue = 0.0076
    try:
        p = json.loads((results / "platform.json").read_text())
        enqueue = p["enqueue_to_start"]["enqueue_to_start_ms_median"] / 1000
    except (OSError, KeyError, json.JSONDecodeError):
        pass
    sources = {
        "e2e": f"bench/results/e2e.json ({e2e.get('date')}): {e2e.get('command')}",
        "platform": "bench/results/platform.json: enqueue_to_start_ms_median",
        "study_s_100": f"{sum(at100.values()):.2f}",
        "study_s_400": f"{sum(at400.values()):.2f}",
    }
    return Costs(at100, at400, route, enqueue, cv, sources)


# -- the region ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    name: str
    tier: str
    per_day: float
    hours: tuple[float, ...]
    stat_share: float


def region_sites(total_per_day: float = 3300.0, seed: int = 1) -> list[Site]:
    """80 sites: each tier's share split across its sites with lognormal spread (sigma 0.35)."""
    rng = random.Random(f"sites-{seed}")
    sites = []
    for tier, count, share, hours, stat in TIERS:
        w = [rng.lognormvariate(0.0, 0.35) for _ in range(count)]
        for i, x in enumerate(sorted(w, reverse=True)):
            per_day = total_per_day * share * x / sum(w)
            sites.append(Site(f"{tier.split()[0]}-{i + 1:02d}", tier, per_day, hours, stat))
    return sites


@dataclass
class Study:
    uid: int
    site: str
    arrival: float  # last instance in the archive (s since midnight)
    slices: int
    stat: bool = False
    burst: bool = False


def weekday(sites: Sequence[Site], rng: random.Random, day: int = 0) -> list[Study]:
    """One weekday of studies: Poisson arrivals per site and hour."""
    sizes, weights = zip(*SLICE_MIX, strict=True)
    out: list[Study] = []
    for s in sites:
        total = sum(s.hours)
        for h, w in enumerate(s.hours):
            rate = s.per_day * w / total / 3600.0  # studies per second in this hour
            t = h * 3600.0
            while rate > 0:
                t += rng.expovariate(rate)
                if t >= (h + 1) * 3600.0:
                    break
                out.append(Study(0, s.name, day * 86400.0 + t,
                                 rng.choices(sizes, weights)[0], rng.random() < s.stat_share))  # fmt: skip
    return out


def burst(site: str, n: int, start_s: float, minutes: float, rng: random.Random) -> list[Study]:
    """``n`` studies from one site, evenly spread over ``minutes`` (a backlog resent)."""
    sizes, weights = zip(*SLICE_MIX, strict=True)
    step = minutes * 60.0 / n
    return [Study(0, site, start_s + i * step, rng.choices(sizes, weights)[0], burst=True)
            for i in range(n)]  # fmt: skip


# -- the platform ----------------------------------------------------------------------------
@dataclass
class Job:
    id: int
    study: Study
    rule: str
    priority: int
    service_s: float
    created: float = math.nan
    dispatched: float = math.nan
    started: float = math.nan
    finished: float = math.nan


@dataclass
class Result:
    studies: list[Study]
    jobs: list[Job]
    slots: int
    max_in_flight: int
    stored: dict[int, float]  # study uid -> time its last output was stored

    def latency(self, study: Study) -> float:
        return self.stored[study.uid] - study.arrival


class JobStore:
    """The order of ``JobStore.release``, in memory (same keys, same tie-breaks)."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[int, str], deque[Job]] = {}
        self.busy: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.in_flight = 0

    def add(self, job: Job) -> None:
        self.waiting.setdefault((job.priority, job.study.site), deque()).append(job)

    def release(self, capacity: int, now: float) -> list[Job]:
        free = capacity - self.in_flight
        if free <= 0:
            return []
        cands = []
        for (prio, inst), q in self.waiting.items():
            busy = self.busy.get(inst, 0)
            last = self.last.get(inst, 0.0)
            for rn, job in enumerate(islice(q, free), start=1):
                cands.append(((-prio, rn + busy, last, job.id), job))
        picked = [j for _, j in heapq.nsmallest(free, cands, key=lambda c: c[0])]
        for job in picked:
            q = self.waiting[(job.priority, job.study.site)]
            q.remove(job)
            if not q:
                del self.waiting[(job.priority, job.study.site)]
            job.dispatched = now
            self.last[job.study.site] = now
            self.busy[job.study.site] = self.busy.get(job.study.site, 0) + 1
            self.in_flight += 1
        return picked

    def finish(self, job: Job) -> None:
        self.busy[job.study.site] -= 1
        self.in_flight -= 1


def simulate(
    studies: Iterable[Study],
    *,
    hosts: int,
    concurrency: int,
    costs: Costs,
    quiet_s: float = 30.0,
    seed: int = 1,
    jobs_of: Any = None,
) -> Result:
    """Run the studies through the platform; ``jobs_of(study)`` -> [(rule, priority, seconds)]
    overrides the default CT rules (tests use it for closed-form cases)."""
    rng = random.Random(f"service-{seed}")
    sigma = math.sqrt(math.log(1 + costs.noise_cv**2))

    def default_jobs(st: Study) -> list[tuple[str, int, float]]:
        noise = rng.lognormvariate(-(sigma**2) / 2, sigma)  # mean 1: one study's load varies
        out = []
        for rule, prio, _ in RULES:
            p = PRIORITY["urgent"] if st.stat and rule == "ct-volume-mpr" else PRIORITY[prio]
            out.append((rule, p, costs.job_s(rule, st.slices) * noise))
        return out

    make = jobs_of or default_jobs
    slots = hosts * concurrency
    store = JobStore()
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, obj: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, obj))

    all_studies = sorted(studies, key=lambda s: s.arrival)
    for uid, st in enumerate(all_studies):
        st.uid = uid
        push(st.arrival + quiet_s + costs.route_delay_s, "route", st)
    jobs: list[Job] = []
    remaining: dict[int, int] = {}
    stored: dict[int, float] = {}
    max_in_flight = 0

    def release(now: float) -> None:
        nonlocal max_in_flight
        for job in store.release(slots, now):
            job.started = now + costs.enqueue_to_start_s
            job.finished = job.started + job.service_s
            push(job.finished, "done", job)
        max_in_flight = max(max_in_flight, store.in_flight)

    while events:
        now, _, kind, obj = heapq.heappop(events)
        if kind == "route":
            specs = make(obj)
            remaining[obj.uid] = len(specs)
            for rule, prio, service in specs:
                job = Job(len(jobs), obj, rule, prio, service, created=now)
                jobs.append(job)
                store.add(job)
            if not specs:
                stored[obj.uid] = now
        else:
            store.finish(obj)
            remaining[obj.study.uid] -= 1
            if remaining[obj.study.uid] == 0:
                stored[obj.study.uid] = now
        release(now)
    return Result(all_studies, jobs, slots, max_in_flight, stored)


# -- figures ---------------------------------------------------------------------------------
def pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs; nan when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def day_figures(res: Result) -> dict[str, float]:
    lat = [res.latency(s) for s in res.studies if not s.burst]
    stat = [j.finished - j.study.arrival for j in res.jobs
            if j.priority == PRIORITY["urgent"]]  # fmt: skip
    by_hour: dict[int, list[float]] = {}
    for s in res.studies:
        if not s.burst:
            by_hour.setdefault(int(s.arrival % 86400 // 3600), []).append(res.latency(s))
    busy = sum(j.service_s for j in res.jobs)
    span = max(j.finished for j in res.jobs) - min(s.arrival for s in res.studies)
    peak_hour = max(by_hour, key=lambda h: len(by_hour[h]))
    peak_busy = sum(j.service_s for j in res.jobs if int(j.started % 86400 // 3600) == peak_hour)
    days = max(1, round(span / 86400))
    return {
        "p50": pct(lat, 0.50),
        "p95": pct(lat, 0.95),
        "p99": pct(lat, 0.99),
        "max": max(lat),
        "worst_hour_p95": max(pct(v, 0.95) for v in by_hour.values()),
        "stat_p95": pct(stat, 0.95),
        "util_day": busy / (res.slots * span),
        "util_peak_hour": peak_busy / (res.slots * 3600.0 * days),
        "peak_hour_studies": len(by_hour[peak_hour]) / days,
    }


def burst_figures(res: Result, start: float) -> dict[str, float]:
    """STAT jobs and other sites' studies routed while the burst's jobs were not all done."""
    bursts = [s for s in res.studies if s.burst]
    end = max(res.stored[s.uid] for s in bursts)
    during = [s for s in res.studies if not s.burst and start <= s.arrival <= end]
    site = bursts[0].site
    stat = [j.finished - j.study.arrival for j in res.jobs
            if j.priority == PRIORITY["urgent"] and start <= j.study.arrival <= end]  # fmt: skip
    return {
        "drain_min": (end - start) / 60.0,
        "stat_p95": pct(stat, 0.95),
        "stat_n": float(len(stat)),
        "others_p95": pct([res.latency(s) for s in during if s.site != site], 0.95),
        # other sites' normal-priority outputs (MPR, lungs): ahead of the burst's jobs
        "others_normal_p95": pct(
            [
                j.finished - j.study.arrival
                for j in res.jobs
                if j.priority >= PRIORITY["normal"] and j.study in during and j.study.site != site
            ],
            0.95,
        ),  # fmt: skip
        "burst_p95": pct([res.latency(s) for s in bursts], 0.95),
    }


@dataclass
class Scenario:
    seed: int = 1
    days: int = 5
    per_day: float = 3300.0
    concurrency: int = 2
    quiet_s: float = 30.0
    burst_n: int = 300
    burst_start_h: float = 10.0
    burst_minutes: float = 15.0


def run(sc: Scenario, hosts: int, costs: Costs, with_burst: bool) -> tuple[Result, float]:
    """``sc.days`` weekdays (one burst on day 0 at ``burst_start_h``) on ``hosts`` hosts."""
    sites = region_sites(sc.per_day, sc.seed)
    rng = random.Random(f"arrivals-{sc.seed}")
    studies = [st for d in range(sc.days) for st in weekday(sites, rng, d)]
    start = sc.burst_start_h * 3600.0
    if with_burst:
        big = max(sites, key=lambda s: s.per_day).name
        studies += burst(big, sc.burst_n, start, sc.burst_minutes, rng)
    res = simulate(studies, hosts=hosts, concurrency=sc.concurrency, costs=costs,
                   quiet_s=sc.quiet_s, seed=sc.seed)  # fmt: skip
    return res, start


def table(sc: Scenario, hosts: Sequence[int], costs: Costs) -> list[dict[str, Any]]:
    rows = []
    for h in hosts:
        day = day_figures(run(sc, h, costs, with_burst=False)[0])
        res, start = run(sc, h, costs, with_burst=True)
        rows.append({"hosts": h, "slots": h * sc.concurrency, **day,
                     **{f"burst_{k}": v for k, v in burst_figures(res, start).items()}})  # fmt: skip
    return rows


def _m(s: float) -> str:
    return "—" if math.isnan(s) else f"{s:.0f} s" if s < 600 else f"{s / 60:.0f} min"


def render(rows: list[dict[str, Any]], sc: Scenario) -> str:
    head = (
        "| hosts (slots) | utilisation day / peak hour | p50 | p95 | p99 | worst hour p95 "
        "| STAT p95 | burst: drained after | burst: STAT p95 | burst: other sites' normal "
        "jobs p95 | burst: other sites' studies p95 |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['hosts']} ({r['slots']}) | {r['util_day']:.0%} / {min(r['util_peak_hour'], 9.99):.0%} "
            f"| {_m(r['p50'])} | {_m(r['p95'])} | {_m(r['p99'])} | {_m(r['worst_hour_p95'])} "
            f"| {_m(r['stat_p95'])} | {r['burst_drain_min']:.0f} min | {_m(r['burst_stat_p95'])} "
            f"| {_m(r['burst_others_normal_p95'])} | {_m(r['burst_others_p95'])} |"
        )
    peak = rows[0]["peak_hour_studies"] if rows else 0
    lines.append(f"\nLatency from the study's last instance in the archive to its last output "
                 f"stored (the {sc.quiet_s:g} s quiet period included); {sc.days} weekdays, "
                 f"{sc.per_day:.0f} studies/day, busiest hour {peak:.0f} studies, seed {sc.seed}; burst: "
                 f"{sc.burst_n} studies from the largest site over {sc.burst_minutes:g} min "
                 f"from {sc.burst_start_h:g}:00 on day 1.")  # fmt: skip
    return "\n".join(lines)


def answers(rows: list[dict[str, Any]], limit_s: float = 300.0) -> dict[str, Any]:
    ok = [r for r in rows if r["p95"] < limit_s and r["worst_hour_p95"] < limit_s]
    best = min(ok, key=lambda r: r["hosts"]) if ok else None
    return {
        "hosts_needed": best["hosts"] if best else None,
        "hosts_needed_day_p95": min(
            (r["hosts"] for r in rows if r["p95"] < limit_s), default=None
        ),  # fmt: skip
        "stat_p95_burst_s": best["burst_stat_p95"] if best else None,
        "row": best,
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sim", description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--days", type=int, default=5, help="weekdays simulated (default 5)")
    ap.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--per-day", type=float, default=3300.0, help="studies per weekday")
    ap.add_argument("--concurrency", type=int, default=2, help="pool processes per host")
    ap.add_argument("--quiet", type=float, default=30.0, help="StableAge / quiet period (s)")
    ap.add_argument("--burst", type=int, default=300, help="studies in the one-site burst")
    ap.add_argument("--burst-minutes", type=float, default=15.0)
    ap.add_argument("--results", type=Path, default=RESULTS, help="where e2e.json is")
    ap.add_argument("--write", action="store_true", help="write bench/results/sim.json")
    a = ap.parse_args(argv)
    sc = Scenario(a.seed, a.days, a.per_day, a.concurrency, a.quiet, a.burst,
                  burst_minutes=a.burst_minutes)  # fmt: skip
    costs = measured_costs(a.results)
    print("measured worker seconds per job (100 / 400 slices):")
    for rule, _, _ in RULES:
        print(f"  {rule:<16} {costs.at100[rule]:6.2f} / {costs.at400[rule]:6.2f}")
    print(f"  route delay {costs.route_delay_s:.2f} s, enqueue to start "
          f"{costs.enqueue_to_start_s * 1000:.1f} ms, study-to-study spread (CV) "
          f"{costs.noise_cv:.2f}; from {costs.sources['e2e']}")  # fmt: skip
    if costs.sources.get("note"):
        print(f"  ({costs.sources['note']})")
    print()
    rows = table(sc, a.hosts, costs)
    print(render(rows, sc))
    ans = answers(rows)
    h = ans["hosts_needed"]
    if h is None:
        print("\nno host count tried keeps p95 stable -> stored under 5 min")
    else:
        print(f"\n(1) {h} two-core worker hosts keep p95 stable -> stored under 5 min (whole day "
              f"and every hour); (2) STAT p95 during the {sc.burst_n}-study burst on {h} hosts: "
              f"{ans['stat_p95_burst_s']:.0f} s")  # fmt: skip
    if a.write:
        _write(rows, ans, sc, costs)


def _write(rows: list[dict[str, Any]], ans: dict[str, Any], sc: Scenario, costs: Costs) -> None:
    from bench.common import command_line, row, write_result

    cmd = command_line("bench.sim")
    detail = (f"80 sites, {sc.per_day:.0f} studies/weekday, {sc.days} weekdays, seed {sc.seed}, "
              f"{sc.concurrency} pool processes per host, quiet period {sc.quiet_s:g} s "
              f"included; costs {costs.sources['e2e']}; docs/scale.md")  # fmt: skip
    out = [row("sim.hosts_needed", "2-core worker hosts keeping p95 stable → stored under 5 min "
               "(day and every hour; simulated)", ans["hosts_needed"], "hosts", detail=detail,
               command=cmd)]  # fmt: skip
    r0 = ans["row"]
    if r0:
        out.append(row("sim.stat_p95_burst", f"STAT lane p95 while one site sends "
                       f"{sc.burst_n} studies ({r0['hosts']} hosts; simulated)",
                       r0["burst_stat_p95"], "s",
                       detail=f"{r0['burst_stat_n']:.0f} STAT jobs; burst drained after "
                       f"{r0['burst_drain_min']:.0f} min; other sites meanwhile: normal jobs "
                       f"p95 {_m(r0['burst_others_normal_p95'])}, whole studies (low-priority "
                       f"bone rule included) p95 {_m(r0['burst_others_p95'])}",
                       command=cmd))  # fmt: skip
    for r in rows:
        out.append(row(f"sim.p95.{r['hosts']}", f"p95 stable → stored, {r['hosts']} hosts "
                       f"({r['slots']} slots)", r["p95"], "s", target=300.0,
                       detail=f"p50 {_m(r['p50'])}, p99 {_m(r['p99'])}, worst hour p95 "
                       f"{_m(r['worst_hour_p95'])}, utilisation {r['util_day']:.0%} (peak hour "
                       f"{r['util_peak_hour']:.0%}), STAT p95 {_m(r['stat_p95'])}; burst: "
                       f"drained {r['burst_drain_min']:.0f} min, STAT p95 "
                       f"{_m(r['burst_stat_p95'])}, other sites' normal jobs p95 "
                       f"{_m(r['burst_others_normal_p95'])}, studies p95 "
                       f"{_m(r['burst_others_p95'])}", command=cmd))  # fmt: skip
    raw = {"scenario": sc.__dict__, "table": rows, "costs": {
        "at100": costs.at100, "at400": costs.at400, "route_delay_s": costs.route_delay_s,
        "enqueue_to_start_s": costs.enqueue_to_start_s, "noise_cv": costs.noise_cv,
        "sources": costs.sources}}  # fmt: skip
    path = write_result("sim", out, raw, cmd)
    doc = json.loads(path.read_text())
    doc["machine"].pop("load_avg", None)  # a simulation: the machine's load does not matter
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
