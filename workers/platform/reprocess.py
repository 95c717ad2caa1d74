"""Reprocessing on request: run steps again on a study with other (or the same) parameters.

Same parameters as the rule that ran first -> same output UIDs -> the archive replaces the
earlier outputs. Other parameters -> new UIDs -> a new series whose SeriesDescription ends with
what changed, e.g. ``[thickness_mm=5]``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines import StepError, canonical_params, get_step
from pipelines.registry import params_error_text
from workers.core.config import settings
from workers.platform.dispatcher import Dispatcher
from workers.platform.jobmodels import StudyRow
from workers.platform.jobstore import Job, JobStore

log = logging.getLogger("sprim.jobs")


class NotFound(LookupError):
    """No such study/job for this requester (also across institutions: no existence leak)."""


class BadRequest(ValueError):
    """The request names an unknown step or invalid params; the message says which.

    ``fields``: param name -> what is wrong with it (the console shows each next to its input).
    """

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.fields = dict(fields or {})


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """``key=value`` (value as YAML) -> dict; ``step.key=value`` keys are kept dotted."""
    out: dict[str, Any] = {}
    for s in sets:
        if "=" not in s:
            raise BadRequest(f"--set {s!r}: use key=value")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise BadRequest(f"--set {s!r}: {e}") from None
    return out


def _changed(base: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    def shown(v: Any) -> str:  # 5.0 -> "5": the description has 24 characters for all changes
        v = int(v) if isinstance(v, float) and v.is_integer() else v
        return json.dumps(v, separators=(",", ":")).strip('"')

    diffs = [f"{k}={shown(new[k])}" for k in sorted(new) if base.get(k) != new[k]]
    return ("[" + ",".join(diffs) + "]") if diffs else ""


def visible(job: Job, institution: str | None) -> bool:
    return institution in (None, "*") or job.institution == institution


def reprocess(
    store: JobStore,
    study_uid: str,
    steps: Sequence[str | Mapping[str, Any]],
    *,
    requester: str,
    institution: str | None = None,
    series_uid: str | None = None,
    priority: int = 2,
    disp: Dispatcher | None = None,
) -> Job:
    """Queue a job on a study sprim has processed or seen; return it (queued).

    Parameters
    ----------
    steps : sequence of str or dict
        ``"name"`` or ``{"use": name, "with": {...}}``; params missing from ``with`` keep the
        values the study was processed with (else the step's defaults).
    institution : str, optional
        The requester's institution (API token); ``None`` or ``"*"``: any.
    priority : int
        2 urgent (a radiologist is waiting), 1 normal, 0 low.
    """
    from workers.platform.submission import release

    prior = [j for j in store.list(study_uid=study_uid, limit=1000) if visible(j, institution)]
    row = store.study(study_uid)
    # The study's owner is the institution it was recorded for; without a record, its jobs'.
    owned = visible_row(row, institution) if row is not None and row.institution else bool(prior)
    if not owned:
        raise NotFound(f"study {study_uid} not found")
    known = _series_of_study(row, prior)
    ran = [j for j in prior if j.series_uid in known and j.state != "no_match"]
    if series_uid is None:
        if not ran:
            raise NotFound(f"study {study_uid}: no processed series; name one (series_uid)")
        series_uid = str(ran[0].series_uid)  # ran: jobs of known series only
    elif series_uid not in known:
        raise NotFound(f"study {study_uid} has no series {series_uid}")
    base_job = next((j for j in ran if j.series_uid == series_uid), ran[0] if ran else None)
    wanted: list[dict[str, Any]] = [{"use": s} if isinstance(s, str) else dict(s) for s in steps]
    if not wanted:
        raise BadRequest("name at least one step")
    rule: str | None = None
    out_steps: list[dict[str, Any]] = []
    suffixes: list[str] = []
    for w in wanted:
        step, suffix, ran_rule = _requested_step(w, ran, series_uid, known)
        rule = rule or ran_rule
        suffixes.append(suffix)
        out_steps.append(step)
    src = (base_job or ran[0]) if ran else None
    # where the study is: the job it ran as, else the study record, else any job of it
    where: Job | StudyRow = src or row or prior[0]
    job = store.create_job(
        rule=rule or "reprocess",
        requester=requester,
        study_uid=study_uid,
        series_uid=series_uid,
        institution=where.institution or "unknown",
        source=where.source,
        archive=where.archive,
        destination=src.destination if src else None,
        priority=priority,
        steps=out_steps,
        description_suffix=" ".join(s for s in suffixes if s)[:24],
        context={"requested_by": requester},
        actor=requester,
    )
    log.info("job=%d event=reprocess_queued study=%s requester=%s", job.id, study_uid, requester)
    release(store, disp)
    return job


def _requested_step(
    w: Mapping[str, Any], ran: Sequence[Job], series_uid: str, known: Mapping[str, dict]
) -> tuple[dict[str, Any], str, str | None]:
    """One requested step: (job step with every param, description suffix of the params that
    differ from the last run's, the rule of that run); BadRequest naming a refused param."""
    try:
        st = get_step(str(w.get("use")))
    except KeyError as e:
        raise BadRequest(e.args[0]) from None
    base, rule = _ran_with(ran, st.name, series_uid)
    try:
        params = st.validate({**base, **(w.get("with") or {})})
    except ValidationError as e:
        fields = {str(err["loc"][0]): err["msg"] for err in e.errors() if err.get("loc")}
        raise BadRequest(f"{st.name}: {params_error_text(e)}", fields) from None
    except Exception as e:  # noqa: BLE001  ('with' that is not a mapping)
        raise BadRequest(f"{st.name}: {e}") from None
    _check_size(st, params, known[series_uid])
    canon = json.loads(canonical_params(params))
    ref = json.loads(canonical_params(st.validate(base)))
    return {"use": st.name, "version": st.version, "with": canon}, _changed(ref, canon), rule


def _ran_with(ran: Sequence[Job], name: str, series_uid: str) -> tuple[dict[str, Any], str | None]:
    """The params step ``name`` ran with on the series (newest job first) and that job's rule."""
    for j in ran:
        hit = next((s for s in j.steps if s["use"] == name), None)
        if hit and j.series_uid == series_uid:
            return dict(hit.get("with") or {}), j.rule
    return {}, None


def visible_row(row: Any, institution: str | None) -> bool:
    return institution in (None, "*") or row.institution == institution


def _series_of_study(row: Any, prior: Sequence[Job]) -> dict[str, dict]:
    """Series a reprocess may name: those recorded for the study, and those its rules ran on.

    Never a UID taken from the request or from an earlier reprocess alone: a series of another
    study (another institution's) is not this study's.
    """
    known: dict[str, dict] = {}
    for s in (row.series or []) if row is not None else []:
        if s.get("SeriesInstanceUID"):
            known[str(s["SeriesInstanceUID"])] = s
    for j in prior:
        if j.series_uid and j.requester is None:  # created by the rules from the study's series
            known.setdefault(j.series_uid, {})
    return known


def _geometry(attrs: Mapping[str, Any]) -> tuple[tuple[int, int, int], tuple[float, ...]] | None:
    """(shape z,y,x; spacing x,y,z in mm) of a series from its routing attributes, if known."""
    try:
        rows, cols = int(attrs["Rows"]), int(attrs["Columns"])
        n = int(
            attrs.get("NumberOfImages")
            or attrs.get("NumberOfFrames")
            or attrs["NumberOfSeriesRelatedInstances"]
        )
        ps = attrs["PixelSpacing"]
        dy, dx = (float(ps[0]), float(ps[1])) if isinstance(ps, list) else (float(ps),) * 2
        dz = float(attrs.get("SpacingBetweenSlices") or attrs["SliceThickness"])
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if min(rows, cols, n) < 1 or min(dx, dy, dz) <= 0:
        return None
    return (n, rows, cols), (dx, dy, dz)


def _check_size(st: Any, params: Any, attrs: Mapping[str, Any]) -> None:
    """Refuse params whose output would exceed ``SPRIM_MAX_VOLUME_MB`` on this series."""
    check = getattr(st, "check_output_size", None)
    geom = _geometry(attrs)
    if check is None or geom is None:
        return
    max_mb = getattr(settings(), "max_volume_mb", 2048)
    try:
        check(params, geom[0], geom[1], max_mb * 2**20)
    except StepError as e:
        raise BadRequest(f"{st.name}: {e}") from None


def cancel(store: JobStore, job_id: int, *, actor: str, institution: str | None = None) -> Job:
    job = store.get(job_id)
    if job is None or not visible(job, institution):
        raise NotFound(f"job {job_id} not found")
    out = store.transition(
        job_id, "cancelled", expect=("queued", "running"), actor=actor, detail="cancelled"
    )
    if out is None:
        raise BadRequest(
            f"job {job_id} is {job.state}: only queued or running jobs can be cancelled"
        )
    return out


def retry(
    store: JobStore, job_id: int, *, actor: str, institution: str | None = None, disp=None
) -> Job:
    from workers.platform.submission import release

    job = store.get(job_id)
    if job is None or not visible(job, institution):
        raise NotFound(f"job {job_id} not found")
    # a running job whose lease expired (its worker is gone) can be retried too
    expired = job.state == "running" and (job.lease_expires_at or 0) < time.time()
    out = store.transition(
        job_id, "queued", expect=("failed", "partial", "cancelled", *(("running",) if expired else ())),
        where={"lease_owner": job.lease_owner} if expired else None, actor=actor,
        detail="manual retry" + (" (lease expired)" if expired else ""), attempts=0,
        worker_losses=0, not_before=None, dispatched_at=None, dispatched_to=None,
        lease_owner=None, lease_expires_at=None, error=None, finished_at=None,
    )  # fmt: skip
    if out is None:
        raise BadRequest(
            f"job {job_id} is {job.state}: only failed, partial, cancelled or lease-expired "
            "running jobs can be retried"
        )
    release(store, disp)
    return out
