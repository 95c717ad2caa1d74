"""Storing while computing: each output of a job goes to the archive as soon as it is written.

Up to ``SPRIM_STORE_PARALLEL`` outputs are stored at once by a small thread pool that lives
for one attempt (joined when it ends, whatever happens), while the next steps compute. The job
is ``done`` only once the archive confirmed every output (:meth:`OutputStore.finish`):

- an archive that refuses one output for good (permanent :class:`ArchiveError`) fails that
  output only, with the archive's reason; the others are stored (the job ends ``partial``);
- a transient error (archive down, timeout, 5xx) ends the attempt at the next step boundary
  and requeues the job, as a transient error always has: the next attempt makes and stores
  every output again (deterministic UIDs: the ones already stored are replaced, not doubled).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.archives import Archive, ArchiveError

if TYPE_CHECKING:
    from workers.processing.runner import RunReport
    from workers.writers import WrittenObject

log = logging.getLogger("sprim.jobs")


@dataclass
class StoredOutput:
    """One output's store: when it started and ended (epoch seconds), and its outcome."""

    step: str
    output: str
    objects: list[WrittenObject]
    started_at: float = 0.0
    ended_at: float = 0.0
    error: ArchiveError | None = None


class OutputStore:
    """A job attempt's stores (see module docstring); use as a context manager."""

    def __init__(self, archive: Archive, job_id: int, parallel: int) -> None:
        self.archive, self.job_id = archive, job_id
        self._pool = ThreadPoolExecutor(max(1, parallel), thread_name_prefix=f"store-job{job_id}")
        self._pending: list[tuple[StoredOutput, Future]] = []
        self._transient: ArchiveError | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> OutputStore:
        return self

    def __exit__(self, *exc: object) -> None:
        # Stores already sent are awaited (never left running after the attempt); queued ones
        # are dropped when the attempt failed.
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, step: str, output: str, objects: list[WrittenObject]) -> None:
        """Store one output's objects (runner callback; returns at once)."""
        if not objects or self._transient is not None:
            return
        rec = StoredOutput(step, output, list(objects))
        self._pending.append((rec, self._pool.submit(self._store, rec)))

    def _store(self, rec: StoredOutput) -> StoredOutput:
        rec.started_at = time.time()
        try:
            self.archive.store([w.path for w in rec.objects])
        except ArchiveError as e:
            rec.error = e
            if e.transient:
                with self._lock:
                    self._transient = self._transient or e
        rec.ended_at = time.time()
        log.info(
            "job=%d event=output_stored step=%s output=%r instances=%d started=%.3f ended=%.3f"
            " seconds=%.2f%s", self.job_id, rec.step, rec.output, len(rec.objects),
            rec.started_at, rec.ended_at, rec.ended_at - rec.started_at,
            f" error={rec.error}" if rec.error else "",
        )  # fmt: skip
        return rec

    def check(self) -> None:
        """Raise the first transient store error (called between steps: stop early)."""
        if self._transient is not None:
            raise self._transient

    def finish(self, report: RunReport) -> list[StoredOutput]:
        """Wait until every output is stored; outputs the archive refused become failures of
        ``report`` (their objects leave it). Raises the first transient error."""
        from workers.processing.runner import OutputFailure

        done = [f.result() for _, f in self._pending]
        self.check()
        refused = [r for r in done if r.error is not None]
        if refused:
            gone = {id(w) for r in refused for w in r.objects}
            for sr in report.steps:
                sr.outputs = [w for w in sr.outputs if id(w) not in gone]
            report.failures += [
                OutputFailure(r.step, r.output, f"archive: {r.error.reason or r.error}")
                for r in refused
            ]
        return done


def overlap_s(stored: list[StoredOutput], steps_end: float) -> float:
    """Seconds of storing done before the last step ended (what storing while computing saved)."""
    return sum(max(0.0, min(r.ended_at, steps_end) - r.started_at) for r in stored)
