"""Prometheus endpoint of a Celery worker: ``SPRIM_METRICS_PORT`` (0: none).

The prefork pool runs jobs in child processes, each with its own memory, so a counter in one
is invisible to the others. prometheus_client's multiprocess mode has every process of the
worker write its series to files in ``PROMETHEUS_MULTIPROC_DIR``; the worker's main process
serves their sum. The folder is the worker's own (one per worker; files of earlier processes
are removed here at start). Pool processes replaced after ``worker_max_tasks_per_child`` jobs
leave their files: their counts stay in the sums, as counters must.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from celery import signals

from workers.core.config import settings

log = logging.getLogger("sprim.tasks")


def _clear_earlier_processes(folder: Path) -> None:
    """Remove the files of processes of an earlier run (never this process's own)."""
    for f in folder.glob("*.db"):
        m = re.search(r"_(\d+)\.db$", f.name)
        if m and int(m.group(1)) != os.getpid():
            f.unlink(missing_ok=True)


@signals.worker_init.connect
def _serve_metrics(**_kw) -> None:
    """In the worker's main process, before the pool forks."""
    port = settings().metrics_port
    if not port:
        return
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        raise SystemExit(
            "SPRIM_METRICS_PORT is set but PROMETHEUS_MULTIPROC_DIR is not: the pool "
            "processes' metrics need a folder of this worker's own (e.g. /tmp/sprim-metrics)"
        )
    Path(folder).mkdir(parents=True, exist_ok=True)
    _clear_earlier_processes(Path(folder))
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, registry=registry)
    log.info("event=metrics_serving port=%d folder=%s", port, folder)


@signals.worker_process_shutdown.connect
def _process_gone(pid=None, **_kw) -> None:
    """A pool process ended: its live gauges leave the sums (its counters stay)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())
