"""The region simulation (bench/sim.py) keeps the platform's rules and the queueing arithmetic."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from bench import sim
from bench.sim import PRIORITY, Costs, Scenario, Study, simulate

ZERO = Costs(at100={r: 1.0 for r, _, _ in sim.RULES}, at400={r: 4.0 for r, _, _ in sim.RULES},
             route_delay_s=0.0, enqueue_to_start_s=0.0, noise_cv=0.0)  # fmt: skip


def one_job(seconds: float, priority: str = "normal"):
    return lambda st: [("r", PRIORITY[priority], seconds)]


def test_every_study_finishes_and_slots_are_never_oversubscribed() -> None:
    sc = Scenario(seed=3, days=1, per_day=900.0)
    costs = sim.measured_costs()
    res, _ = sim.run(sc, hosts=1, costs=costs, with_burst=True)
    assert len(res.stored) == len(res.studies) > 900  # the day's studies and the 300 of the burst
    assert len(res.jobs) == 3 * len(res.studies)  # the three default CT rules, each once
    for j in res.jobs:
        assert j.created <= j.dispatched <= j.started < j.finished
        assert j.created >= j.study.arrival + sc.quiet_s
    # sweep the start/finish events: never more running jobs than pool processes
    events = sorted([(j.started, 1) for j in res.jobs] + [(j.finished, -1) for j in res.jobs],
                    key=lambda e: (e[0], e[1]))  # fmt: skip
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    assert peak <= res.slots == 2 and res.max_in_flight <= res.slots
    for st in res.studies:
        last = max(j.finished for j in res.jobs if j.study is st)
        assert res.stored[st.uid] == last


def test_another_sites_study_starts_at_the_first_free_slot_during_a_burst() -> None:
    # docs/platform.md: "0 burst jobs started between its submission and its start"
    studies = [Study(0, "burst-site", 0.001 * i, 400) for i in range(30)]
    other = Study(0, "clinic", 5.0, 400)
    res = simulate([*studies, other], hosts=2, concurrency=1, costs=ZERO, quiet_s=0.0,
                   jobs_of=one_job(10.0))  # fmt: skip
    mine = next(j for j in res.jobs if j.study is other)
    burst_starts = [j.started for j in res.jobs if j.study.site == "burst-site"]
    assert mine.started == 10.0  # the first slot that frees after it was routed
    assert not [t for t in burst_starts if mine.created < t < mine.started]
    assert min(t for t in burst_starts if t > mine.created) == pytest.approx(10.001)  # next slot


def test_institutions_are_served_round_robin() -> None:
    # three sites with 4 queued jobs each, one slot: A B C A B C ... (rank, then least recent)
    studies = [Study(0, site, 0.01 * i + k * 0.001, 400) for i in range(4)
               for k, site in enumerate("ABC")]  # fmt: skip
    res = simulate(studies, hosts=1, concurrency=1, costs=ZERO, quiet_s=0.0,
                   jobs_of=one_job(1.0))  # fmt: skip
    order = [j.study.site for j in sorted(res.jobs, key=lambda j: j.started)]
    assert "".join(order) == "ABC" * 4


def test_urgent_jobs_go_first_and_priority_outranks_fairness() -> None:
    studies = [Study(0, "A", 0.0, 400) for _ in range(6)]
    stat = Study(0, "A", 0.5, 400, stat=True)
    low = Study(0, "B", 0.6, 400)

    def jobs(st: Study):
        if st is stat:
            return [("stat", PRIORITY["urgent"], 1.0)]
        if st is low:
            return [("bone", PRIORITY["low"], 1.0)]
        return [("mpr", PRIORITY["normal"], 1.0)]

    res = simulate([*studies, stat, low], hosts=1, concurrency=1, costs=ZERO, quiet_s=0.0,
                   jobs_of=jobs)  # fmt: skip
    by = {j.study.uid: j for j in res.jobs}
    s, b = by[stat.uid], by[low.uid]
    assert s.started == 1.0  # the next free slot, ahead of 5 earlier normal jobs of its site
    # site B's low job waits for every normal job of site A: priority before institutions
    assert b.started == max(j.finished for j in res.jobs if j.priority == PRIORITY["normal"])


def test_a_lone_study_takes_quiet_period_route_delay_and_its_jobs() -> None:
    costs = Costs(at100=ZERO.at100, at400={"ct-volume-mpr": 12.0, "ct-chest-lungs": 6.0,
                                           "ct-bone-3d": 5.0},
                  route_delay_s=0.5, enqueue_to_start_s=0.01, noise_cv=0.0)  # fmt: skip
    st = Study(0, "A", 100.0, 400)
    res = simulate([st], hosts=1, concurrency=2, costs=costs, quiet_s=30.0)
    t0 = 100.0 + 30.0 + 0.5 + 0.01
    # MPR and lungs (normal) start at once; bone (low) when lungs frees its slot
    assert res.latency(st) == pytest.approx(max(t0 + 12.0, t0 + 6.0 + 0.01 + 5.0) - 100.0)


def test_single_queue_with_constant_service_matches_md1() -> None:
    # M/D/1: mean wait in queue = rho * D / (2 (1 - rho))
    rng = random.Random(7)
    d, rho, t = 1.0, 0.6, 0.0
    studies = []
    for _ in range(60_000):
        t += rng.expovariate(rho / d)
        studies.append(Study(0, "A", t, 400))
    res = simulate(studies, hosts=1, concurrency=1, costs=ZERO, quiet_s=0.0,
                   jobs_of=one_job(d))  # fmt: skip
    wait = statistics.fmean(j.started - j.created for j in res.jobs)
    assert wait == pytest.approx(rho * d / (2 * (1 - rho)), rel=0.05)


def test_costs_reproduce_the_measured_study_and_runs_are_deterministic() -> None:
    costs = sim.measured_costs()
    try:
        from_e2e = sim.costs_from_e2e()
    except sim.CostsMissing:  # a quick e2e run: the costs sim.json recorded from a full one
        from_e2e = None
    if from_e2e is not None:
        e2e = json.loads((sim.RESULTS / "e2e.json").read_text())["raw"]["platform"]
        lat = [x for x in e2e["latency"] if x["slices"] == 400]
        medians = sum(statistics.median(x["timings"][k] for x in lat) for k in lat[0]["timings"])
        assert sum(costs.at400.values()) == pytest.approx(medians)
        th = e2e["throughput"]
        per_study = sum(th["timings"].values()) / th["studies"]
        assert sum(costs.at100.values()) == pytest.approx(per_study)
    for rule, _, _ in sim.RULES:  # more slices cost more, in every rule
        assert 0 < costs.at100[rule] < costs.at400[rule]
    sc = Scenario(seed=5, days=1, per_day=800.0)
    a, _ = sim.run(sc, hosts=1, costs=costs, with_burst=False)
    b, _ = sim.run(sc, hosts=1, costs=costs, with_burst=False)
    assert [a.latency(s) for s in a.studies] == [b.latency(s) for s in b.studies]
    sites = sim.region_sites(3300.0, seed=1)
    assert len(sites) == 80 and sum(s.per_day for s in sites) == pytest.approx(3300.0)
