"""``python -m bench.console_pages [--jobs N]``: how long the web console's pages take on a big
job store (SQLite, N jobs over 80 institutions and 3 days; 90 % done), for the "*" token and a
site's token. Median of 7 requests through the app (no network), page size. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

PAGES = ("/console/jobs", "/console/jobs?state=failed&since=24h", "/console/fragments/jobs",
         "/console/failures", "/console/load")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--jobs", type=int, default=20_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sprim-console-bench-"))
    os.environ.update(
        SPRIM_HOME=str(tmp / "home"), SPRIM_JOB_STORE_URL=f"sqlite:///{tmp}/jobs.db",
        SPRIM_API_TOKENS=json.dumps({"site": "SITE 01", "admin": "*"}),
    )  # fmt: skip
    from fastapi.testclient import TestClient

    from workers.interfaces.api import create_app
    from workers.platform.jobstore import JobRow, open_store

    store = open_store()
    now, rnd = time.time(), random.Random(0)
    rows = []
    for i in range(args.jobs):
        created = now - rnd.uniform(0, 3 * 86400)
        state = rnd.choices(["done", "failed", "partial", "queued", "running"], [90, 4, 2, 3, 1])[0]
        end = created + rnd.uniform(30, 600) if state in ("done", "failed", "partial") else None
        rows.append(dict(
            created_at=created, updated_at=end or created, finished_at=end, state=state,
            rule=rnd.choice(["ct-volume-mpr", "ct-chest-lungs", "ct-bone-3d"]),
            study_uid=f"1.2.3.{i}", series_uid=f"1.2.3.{i}.1", source="bench", archive="bench",
            institution=f"SITE {rnd.randint(1, 80):02d}", priority=1, attempts=1,
            steps=[{"use": "reformat.mpr", "with": {}}], context={}, timings={}, outputs=[],
            error="archive: refused" if state == "failed" else None,
        ))  # fmt: skip
    with store.Session.begin() as s:
        s.bulk_insert_mappings(JobRow, rows)
    app = create_app(store)
    print(f"{args.jobs} jobs, 80 institutions, SQLite")
    print("| token | page | median ms | kB |\n|---|---|---|---|")
    for token in ("admin", "site"):
        client = TestClient(app, follow_redirects=False)
        client.post("/console/login", data={"token": token})
        for path in PAGES:
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                r = client.get(path)
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200, (path, r.status_code)
            ms = statistics.median(times) * 1000
            print(f"| {token} | `{path}` | {ms:.0f} | {len(r.content) // 1024} |")


if __name__ == "__main__":
    main()
