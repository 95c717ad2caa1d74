"""Run a corpus case through ``sprim run`` in a subprocess and judge the outcome.

Peak RSS is the child's VmHWM, polled every 50 ms, and its ``ru_maxrss`` from ``os.wait4``
when that exceeds this process's own (see ``run_case``); the TMPDIR of each run is private and
its size polled, so a zip that puts gigabytes there shows up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.mutations.corpus import Case

SPRIM = str(Path(sys.executable).parent / "sprim")
TIMEOUT_S = 180.0
RSS_LIMIT_MB = 1536
#: The outcome rows, in the order the table prints them; the first three are the right ones.
OUTCOMES = (
    "processed correctly",
    "refused with a reason",
    "not selected, defect named",
    "not selected by the rules",
    "wrongly refused",
    "wrong output",
    "internal error",
    "hang",
    "silent exit",
    "over RSS",
)
#: "not selected": the default rules skip a series that is no longer one stack (IsVolume), exit 0;
#: ``sprim run`` then names the defect with the gate's words (headers only, no pixel read).
GOOD = OUTCOMES[:4]


@dataclass
class Result:
    name: str
    family: str
    expect: str
    outcome: str
    exit_code: int | None
    seconds: float
    peak_rss_mb: float
    peak_tmp_mb: float
    detail: str

    @property
    def ok(self) -> bool:
        return self.outcome in GOOD


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _vm_hwm_kb(pid: int) -> int:
    """Peak resident set (VmHWM) of a live process, in kB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_case(case: Case, root: Path, keep: bool = False) -> Result:
    """Build ``case`` under ``root``, run ``sprim run`` on it, judge, clean up."""
    work = root / case.name
    shutil.rmtree(work, ignore_errors=True)
    try:
        inp = case.make(root)
    except Exception as e:  # noqa: BLE001  a generator bug is reported, the run goes on
        shutil.rmtree(work, ignore_errors=True)
        return Result(
            case.name,
            case.family,
            case.expect,
            "internal error",
            None,
            0.0,
            0.0,
            0.0,
            f"the corpus could not build this case: {type(e).__name__}: {e}",
        )
    out, tmp = work / "out", work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "COLUMNS": "200", **dict(case.env)}
    env.pop("SPRIM_RULES_FILE", None)
    parent_kb = _vm_hwm_kb(os.getpid())
    t0 = time.monotonic()
    with open(work / "stdout", "wb") as so, open(work / "stderr", "wb") as se:
        pid = os.posix_spawn(
            SPRIM,
            [SPRIM, "run", str(inp), "--out", str(out)],
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, so.fileno(), 1),
                (os.POSIX_SPAWN_DUP2, se.fileno(), 2),
            ],
        )
        peak_tmp, peak_hwm, hung, status, usage = 0, 0, False, 0, None
        while True:
            got, status, usage = os.wait4(pid, os.WNOHANG)
            if got:
                break
            peak_hwm = max(peak_hwm, _vm_hwm_kb(pid))
            if time.monotonic() - t0 > TIMEOUT_S:
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                hung = True
                break
            peak_tmp = max(peak_tmp, _dir_bytes(tmp))
            time.sleep(0.05)
    seconds = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    # ru_maxrss also counts this (parent) process's RSS at spawn time (the kernel carries the
    # pre-exec high-water mark over exec), so it is used only when it exceeds that.
    maxrss = usage.ru_maxrss if usage else 0
    rss_mb = max(peak_hwm, maxrss if maxrss > parent_kb * 1.1 else 0) / 1024
    stdout = (work / "stdout").read_text(errors="replace")
    stderr = (work / "stderr").read_text(errors="replace")
    outcome, detail = judge(case, code, hung, rss_mb, stdout, stderr, out)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return Result(
        case.name,
        case.family,
        case.expect,
        outcome,
        None if hung else code,
        round(seconds, 2),
        round(rss_mb, 1),
        round(peak_tmp / 2**20, 1),
        detail,
    )


def written(out: Path) -> list[Path]:
    """Derived objects in the output folder (not the summary, log, report.html or previews/)."""
    if not out.is_dir():
        return []
    return [
        p
        for p in out.rglob("*")
        if p.is_file()
        and p.name not in ("summary.json", "sprim-run.log", "report.html")
        and p.relative_to(out).parts[0] != "previews"
    ]


def judge(
    case: Case, code: int, hung: bool, rss_mb: float, stdout: str, stderr: str, out: Path
) -> tuple[str, str]:
    if hung:
        return "hang", f"killed after {TIMEOUT_S:.0f} s"
    if rss_mb > RSS_LIMIT_MB:
        return "over RSS", f"{rss_mb:.0f} MB"
    text = stdout + stderr
    if "Traceback" in text or "\x1b" in stdout:
        return "internal error", _tail(text)
    summary_file = out / "summary.json"
    if not summary_file.is_file():
        return "internal error", f"exit {code}, no summary.json: {_tail(text)}"
    summary = json.loads(summary_file.read_text())
    jobs = summary.get("jobs", [])
    reasons = [j.get("error", "") for j in jobs if j.get("state") != "done"]
    if summary.get("error"):
        reasons.append(summary["error"])
    if any("internal error" in r for r in reasons) or code not in (0, 1):
        return "internal error", f"exit {code}: " + " | ".join(reasons)[:400]
    outputs = written(out)
    if case.skipped and not any(
        case.skipped in s.get("path", "") for s in summary.get("skipped", [])
    ):
        return "silent exit", f"{case.skipped!r} not reported in summary.json 'skipped'"
    said = " ".join(reasons + [n for j in jobs for n in j.get("notes", [])])
    if case.mentions and case.mentions not in said:
        return "silent exit", f"{case.mentions!r} not named in the job notes or errors"
    got_reason = bool(reasons) and all(r.strip() for r in reasons)
    if case.expect == "refused" or (case.expect == "any" and not outputs):
        if outputs:
            return "wrong output", f"exit {code}, {len(outputs)} files written; " + " | ".join(
                reasons
            )[:300]
        if code == 1 and got_reason:
            return "refused with a reason", " | ".join(reasons)[:300]
        unmatched = summary.get("unmatched", [])
        if code == 0 and not jobs and unmatched and all(u.get("reason") for u in unmatched):
            # The rules did not take the damaged series (e.g. no longer one stack): said, not silent.
            if all(u.get("defect") for u in unmatched):
                return "not selected, defect named", unmatched[0]["defect"][:280]
            return "not selected by the rules", unmatched[0]["reason"][:280]
        return "silent exit", f"exit {code}, nothing written, no reason"
    if case.expect == "partial":
        done = [j for j in jobs if j.get("state") == "done"]
        failed = [j for j in jobs if j.get("state") != "done"]
        if code == 1 and done and failed and outputs and got_reason:
            return "processed correctly", " | ".join(reasons)[:300]
        if not failed:
            return "wrong output", f"exit {code}: the broken series was processed"
        return "wrongly refused", f"exit {code}: " + " | ".join(reasons)[:300]
    # processed (or any, with outputs)
    if code == 0 and outputs and all(j.get("state") == "done" for j in jobs):
        notes = "; ".join(n for j in jobs for n in j.get("notes", []))
        return "processed correctly", notes[:300]
    if case.expect == "any":
        return "wrong output", f"exit {code}, {len(outputs)} files written: " + " | ".join(reasons)[
            :300
        ]
    if code == 0 and not outputs:
        return "silent exit", "exit 0, nothing written"
    return "wrongly refused", f"exit {code}: " + " | ".join(reasons)[:300]


def _tail(text: str, n: int = 400) -> str:
    return text.strip()[-n:].replace("\n", " / ")


def run_all(
    cases: list[Case], root: Path, workers: int = 2, keep: bool = False, on_result=None
) -> list[Result]:
    """Run ``cases`` ``workers`` at a time; results in the order of ``cases``."""

    def one(case: Case) -> Result:
        res = run_case(case, root, keep)
        if on_result:
            on_result(res)
        return res

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, cases))


def table(results: list[Result]) -> str:
    """The outcome table (markdown): counts per outcome, with example cases."""
    lines = ["| outcome | cases | examples |", "|---|---|---|"]
    for o in OUTCOMES:
        hit = [r for r in results if r.outcome == o]
        examples = ", ".join(r.name for r in hit[:6]) + (" ..." if len(hit) > 6 else "")
        lines.append(f"| {o} | {len(hit)} | {examples if o not in GOOD else ''} |")
    peak = max(results, key=lambda r: r.peak_rss_mb)
    tmp = max(results, key=lambda r: r.peak_tmp_mb)
    lines.append("")
    lines.append(
        f"{len(results)} cases; peak RSS {peak.peak_rss_mb:.0f} MB ({peak.name}); "
        f"most TMPDIR used {tmp.peak_tmp_mb:.0f} MB ({tmp.name}); "
        f"slowest {max(r.seconds for r in results):.1f} s."
    )
    return "\n".join(lines)
