"""BENCHMARKS.md generation: target lookup, met/missed/not measured, the linear fit."""

from __future__ import annotations

import json
from pathlib import Path

from bench.bench_e2e import fit
from bench.common import row
from bench.report import TARGETS, Target, find, flatten, met, render, write_report

LATENCY = next(t for t in TARGETS if t.id == "e2e_latency")


def _results() -> dict:
    return {
        "e2e": {
            "date": "2026-01-01 00:00 UTC",
            "rows": [row("e2e.latency_400", "latency", 12.5, "s", target=10.0, command="x")],
        },
        "read": {"read_s": 0.8, "read_max_rss_mb": 700.0, "ratio_to_cat": 6.0, "_mtime": "d"},
    }


def test_row_source_and_missed() -> None:
    f = find(LATENCY, _results(), {})
    assert f.value == 12.5 and f.command == "x" and f.source == "e2e.json"
    assert met(LATENCY, f.value) == "**MISSED**"


def test_key_source_of_a_file_without_rows() -> None:
    read_s = next(t for t in TARGETS if t.id == "read_s")
    f = find(read_s, _results(), {"produced_by": {"read": "bench_read"}})
    assert f.value == 0.8 and met(read_s, f.value) == "**met**"
    assert f.command == ".venv/bin/python -m bench.bench_read"


def test_not_measured_says_why() -> None:
    t = Target("x", "9", "thing", ">=", 1.0, "x", (("nope", "row:a"),))
    f = find(t, _results(), {})
    assert f.value is None and "no bench/results/nope.json" in f.detail
    assert met(t, None) == "not measured"


def test_none_value_row_is_not_measured() -> None:
    res = {"e2e": {"date": "d", "rows": [row("e2e.latency_400", "l", None, "s", detail="why")]}}
    f = find(LATENCY, res, {})
    assert f.value is None and "why" in f.detail


def test_flatten_skips_targets() -> None:
    flat = flatten({"a": {"b": [1, 2]}, "targets": {"a": 3}, "ok": True, "s": "x"})
    assert flat == {"a.b.0": 1.0, "a.b.1": 2.0}


def test_render_and_write(tmp_path: Path) -> None:
    text = render(_results(), {"mode": "full", "load_start": [3.0], "load_end": [2.0]})
    assert "never edited by hand" in text and "**MISSED**" in text and "Under load" in text
    assert "not measured" in text  # issue 3/4 targets have no results here
    (tmp_path / "e2e.json").write_text(json.dumps(_results()["e2e"]))
    out = write_report(tmp_path, tmp_path / "B.md")
    assert out.read_text().startswith("# Benchmarks")


def test_fit_is_exact_on_a_line() -> None:
    line = fit([100, 200, 400, 800], [1.5, 2.5, 4.5, 8.5])
    assert abs(line["slope"] - 0.01) < 1e-12 and abs(line["intercept"] - 0.5) < 1e-9
    assert abs(line["r2"] - 1.0) < 1e-12
