"""``make fuzz``: the full mutation corpus through ``sprim run``, with the outcome table.

    python -m tests.mutations [--out DIR] [--workers 2] [--seed 9] [--only SUBSTRING] [--keep]

Writes DIR/results.json (one row per case) and DIR/table.md; exits 1 unless every case ended
processed correctly or refused with a reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from tests.mutations import corpus
from tests.mutations.runner import run_all, table


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutations")
    ap.add_argument("--out", type=Path, default=Path(".sprim/fuzz"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=corpus.SEED)
    ap.add_argument(
        "--only",
        default="",
        help="run only cases whose name contains one of these (comma-separated)",
    )
    ap.add_argument("--keep", action="store_true", help="keep each case in OUT/cases")
    args = ap.parse_args()
    corpus.SEED = args.seed
    wanted = args.only.split(",")
    cases = [c for c in corpus.CASES if any(w in c.name for w in wanted)]
    args.out.mkdir(parents=True, exist_ok=True)

    progress = args.out / "results.jsonl"
    progress.write_text("")

    def show(r) -> None:
        with open(progress, "a") as f:
            f.write(json.dumps(asdict(r)) + "\n")
        mark = "ok " if r.ok else "BAD"
        print(
            f"{mark} {r.name:42s} {r.outcome:22s} exit={r.exit_code} {r.seconds:5.1f}s "
            f"{r.peak_rss_mb:6.0f}MB  {r.detail[:150]}",
            flush=True,
        )

    if args.keep:
        results = run_all(cases, args.out / "cases", args.workers, True, on_result=show)
    else:
        with tempfile.TemporaryDirectory(prefix="sprim-fuzz-") as tmp:
            results = run_all(cases, Path(tmp), args.workers, on_result=show)
    text = table(results)
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    (args.out / "table.md").write_text(text + "\n")
    print()
    print(f"sprim run on {len(results)} mutations (seed {args.seed}):")
    print(text)
    print(f"written: {args.out / 'table.md'}, {args.out / 'results.json'}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
