"""``sprim watch``: follow an Orthanc change feed and hand stable studies to routing.

Orthanc numbers every change (``/changes?since=N&limit=M``); ``StableStudy`` fires once a study
had no new instance for Orthanc's ``StableAge``. For each one the watcher computes the study's
*source fingerprint*: its series and instance counts, leaving out series sprim itself produced
(``Manufacturer`` ``sprim``), so storing derived objects back does not re-trigger the study,
while a late series does.

Durability (no study missed, none processed twice, across kills and restarts):

- the cursor and the fingerprint last submitted per study live in a small JSON state file,
  replaced atomically (temp file, fsync, rename, directory fsync) after every submission;
- before a submission the state records it as *pending* (write-ahead); on restart a pending
  submission is confirmed against the job store (the study's context carries the key) and only
  submitted again when the store has no trace of it;
- a change is acknowledged (cursor moved past it) only after its study was submitted or skipped.

The state is a file rather than a job-store table so the watcher needs no schema migration and
can follow several archives side by side (one state file per archive URL).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import requests

from workers.core.tls import describe_tls_error

log = logging.getLogger(__name__)

SPRIM_MANUFACTURER = "sprim"
#: Submit(study_uid, context) — hands a stable study to routing; context carries ``watch_key``.
Submit = Callable[[str, dict], None]
#: AlreadySubmitted(study_uid, key) — whether routing already holds this submission.
AlreadySubmitted = Callable[[str, str], bool]


class WatchError(Exception):
    """The archive could not be read (transient: the watcher waits and tries again)."""


@dataclass
class WatchState:
    """What survives a restart: the cursor, submitted fingerprints, a pending submission."""

    since: int = 0
    submitted: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    max_studies: int = 200_000

    @classmethod
    def load(cls, path: Path) -> WatchState:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return cls()
        return cls(
            since=int(data.get("since", 0)),
            submitted=dict(data.get("submitted", {})),
            pending=dict(data.get("pending", {})),
        )

    def save(self, path: Path) -> None:
        """Replace the state file atomically and durably."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        while len(self.submitted) > self.max_studies:  # oldest first (insertion order)
            self.submitted.pop(next(iter(self.submitted)))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(
                {"since": self.since, "submitted": self.submitted, "pending": self.pending}, fh
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def state_path(home: Path, orthanc_url: str) -> Path:
    """The state file of one archive under ``home``."""
    tag = hashlib.sha1(orthanc_url.rstrip("/").encode()).hexdigest()[:12]
    return Path(home) / "watch" / f"orthanc-{tag}.json"


class Watcher:
    """Follows one Orthanc's change feed.

    Parameters
    ----------
    orthanc_url : str
        Orthanc REST root, e.g. ``http://127.0.0.1:8042``.
    state_file : Path
        Where the cursor and fingerprints persist.
    submit : Submit
        Hands a study to routing.
    already_submitted : AlreadySubmitted, optional
        Resolves a pending submission after a crash (default: trust nothing, resubmit; routing
        is idempotent by deterministic output UIDs).
    from_start : bool
        With no state yet, start at the beginning of the feed (True: every study the archive
        still lists a change for is routed) or at its end (False: only studies that become
        stable from now on). Either way the first start logs how many changes it replays or
        skips (``event=watch_first_start``).
    batch : int
        Changes read per request.
    """

    def __init__(
        self,
        orthanc_url: str,
        state_file: Path,
        submit: Submit,
        *,
        already_submitted: AlreadySubmitted | None = None,
        from_start: bool = True,
        batch: int = 200,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.url = orthanc_url.rstrip("/")
        self.state_file = Path(state_file)
        self.submit = submit
        self.already_submitted = already_submitted
        self.batch = batch
        self.timeout = timeout
        self.http = session or requests.Session()
        self.state = WatchState.load(self.state_file)
        self._fresh = not self.state_file.exists()
        self.from_start = from_start
        self.submitted_count = 0
        self.skipped_count = 0

    # -- Orthanc ---------------------------------------------------------------------------
    def _get(self, path: str, **params) -> requests.Response:
        try:
            r = self.http.get(self.url + path, params=params or None, timeout=self.timeout)
        except requests.RequestException as e:
            tls = describe_tls_error(e)
            raise WatchError(f"{self.url}{path}: {tls or type(e).__name__}") from e
        if r.status_code >= 500:
            raise WatchError(f"{self.url}{path}: HTTP {r.status_code}")
        if r.status_code in (401, 403):
            why = "credentials refused" if self.http.auth else "credentials required, none set"
            raise WatchError(f"{self.url}{path}: HTTP {r.status_code}: {why}")
        return r

    def fingerprint(self, orthanc_study_id: str) -> tuple[str, str, dict] | None:
        """(StudyInstanceUID, fingerprint, context) of a study; None when it is gone."""
        r = self._get(f"/studies/{orthanc_study_id}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        study = r.json()
        study_uid = study["MainDicomTags"]["StudyInstanceUID"]
        r = self._get(f"/studies/{orthanc_study_id}/series")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        parts = []
        own = 0
        for s in r.json():
            tags = s.get("MainDicomTags", {})
            if tags.get("Manufacturer", "").strip().lower() == SPRIM_MANUFACTURER:
                own += 1
                continue
            parts.append(f"{tags.get('SeriesInstanceUID', s['ID'])}:{len(s.get('Instances', []))}")
        fp = hashlib.sha1("|".join(sorted(parts)).encode()).hexdigest()[:16]
        context: dict[str, float] = {"source_series": len(parts), "sprim_series": own}
        quiet = self._quiet_for(study.get("LastUpdate"))
        if quiet is not None:
            context["quiet_s"] = quiet
        return study_uid, fp, context

    def _quiet_for(self, last_update: str | None) -> float | None:
        """Seconds since the study's last instance, on Orthanc's own clock (no clock skew)."""
        if not last_update:
            return None
        try:
            now = self._get("/tools/now").text.strip()
            fmt = "%Y%m%dT%H%M%S"
            dt = datetime.strptime(now, fmt) - datetime.strptime(last_update, fmt)
        except (WatchError, ValueError):
            return None
        return max(0.0, dt.total_seconds())

    # -- one pass over the feed --------------------------------------------------------------
    def _start_position(self) -> None:
        if not self._fresh:
            return
        r = self._get("/changes", last="")
        r.raise_for_status()
        last = int(r.json().get("Last", 0))
        if self.from_start:
            log.info(
                "event=watch_first_start mode=from-start replay_changes=%d "
                "hint=every study still in the archive's change feed will be routed", last,
            )  # fmt: skip
        else:
            self.state.since = last
            log.info(
                "event=watch_first_start mode=from-now skipped_changes=%d "
                "hint=studies already stable are not routed (--from-start replays them)", last,
            )  # fmt: skip
        self.state.save(self.state_file)
        self._fresh = False

    def recover(self) -> None:
        """Resolve submissions left pending by a crash."""
        for study_uid, key in list(self.state.pending.items()):
            done = bool(self.already_submitted and self.already_submitted(study_uid, key))
            if not done:
                self.submit(study_uid, {"watch_key": key, "recovered": True})
                log.info("event=watch_resubmitted study=%s key=%s", study_uid, key)
            self.state.submitted[study_uid] = key.split(":", 1)[1]
            del self.state.pending[study_uid]
            self.state.save(self.state_file)

    def poll_once(self) -> int:
        """Read the feed until it is done; return the number of studies submitted."""
        self._start_position()
        self.recover()
        n = 0
        while True:
            r = self._get("/changes", since=self.state.since, limit=self.batch)
            r.raise_for_status()
            feed = r.json()
            for change in feed.get("Changes", []):
                if change.get("ChangeType") == "StableStudy":
                    n += self._on_stable_study(change)
                self.state.since = max(self.state.since, int(change["Seq"]))
            last = int(feed.get("Last", self.state.since))
            if last > self.state.since:
                self.state.since = last
            self.state.save(self.state_file)
            if feed.get("Done", True) or not feed.get("Changes"):
                return n

    def _on_stable_study(self, change: dict) -> int:
        found = self.fingerprint(change["ID"])
        if found is None:
            log.info("event=watch_study_gone seq=%s id=%s", change["Seq"], change["ID"])
            return 0
        study_uid, fp, context = found
        if context["source_series"] == 0 or self.state.submitted.get(study_uid) == fp:
            self.skipped_count += 1
            log.info(
                "event=watch_skip seq=%s study=%s reason=%s", change["Seq"], study_uid,
                "only sprim outputs" if context["source_series"] == 0 else "unchanged",
            )  # fmt: skip
            self.state.since = int(change["Seq"])
            return 0
        key = f"{study_uid}:{fp}"
        self.state.pending[study_uid] = key
        self.state.save(self.state_file)  # write-ahead
        self.submit(study_uid, {**context, "watch_key": key, "watch_seq": int(change["Seq"])})
        self.state.submitted.pop(study_uid, None)
        self.state.submitted[study_uid] = fp
        del self.state.pending[study_uid]
        self.state.since = int(change["Seq"])
        self.state.save(self.state_file)
        self.submitted_count += 1
        log.info(
            "event=watch_submit seq=%s study=%s fingerprint=%s source_series=%d",
            change["Seq"], study_uid, fp, context["source_series"],
        )  # fmt: skip
        return 1

    # -- loop ------------------------------------------------------------------------------
    def run(self, interval: float = 1.0, stop: threading.Event | None = None) -> None:
        """Poll every ``interval`` seconds until ``stop`` is set; archive outages are waited out."""
        stop = stop or threading.Event()
        backoff = interval
        try:  # the first start's cursor is placed before "started": what follows is seen
            self._start_position()
        except Exception as e:  # noqa: BLE001  (the loop retries and logs)
            log.warning("event=watch_archive_unreachable error=%r", str(e))
        log.info("event=watch_started url=%s since=%d", self.url, self.state.since)
        while not stop.is_set():
            try:
                self.poll_once()
                backoff = interval
            except WatchError as e:
                log.warning(
                    "event=watch_archive_unreachable error=%r retry_in=%.1f", str(e), backoff
                )
                backoff = min(backoff * 2, 30.0)
            except requests.HTTPError as e:
                log.error("event=watch_http_error error=%r", str(e))
                backoff = min(backoff * 2, 30.0)
            except Exception as e:  # noqa: BLE001  (routing failed: the study stays pending)
                log.error(
                    "event=watch_submit_failed error=%r retry_in=%.1f",
                    f"{type(e).__name__}: {e}",
                    backoff,
                )
                backoff = min(backoff * 2, 30.0)
            stop.wait(backoff)
        log.info(
            "event=watch_stopped since=%d submitted=%d skipped=%d",
            self.state.since, self.submitted_count, self.skipped_count,
        )  # fmt: skip
