"""REST API: jobs and reprocessing on request (FastAPI; OpenAPI docs at ``/docs``).

Every request carries ``Authorization: Bearer <token>``; tokens map to an institution
(``SPRIM_API_TOKENS``, JSON ``{"token": "institution"}``, ``"*"`` = all). A token sees and
reprocesses only its institution's studies: 401 without a valid token, 404 for another
institution's job or study (existence is not revealed).
"""

import hmac
import json
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from workers.config import settings
from workers.dispatch import Dispatcher
from workers.jobstore import STATES, Job, JobStore, open_store
from workers.reprocess import BadRequest, NotFound, cancel, reprocess, retry, visible

JobState = Literal[STATES]  # type: ignore[valid-type]


class StepRequest(BaseModel):
    use: str = Field(..., description="Registered step name, e.g. reformat.mpr.")
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with", description="Params to change."
    )


class ReprocessRequest(BaseModel):
    steps: list[StepRequest] = Field(..., min_length=1)
    series_uid: str | None = Field(None, description="Default: the series processed before.")
    priority: str = Field("urgent", pattern="^(urgent|normal|low)$")
    requester: str = Field("api", description="Who asks (audit trail).")


class JobOut(BaseModel):
    id: int
    state: str
    rule: str | None
    requester: str | None
    study_uid: str
    series_uid: str | None
    institution: str
    priority: int
    steps: list
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: dict
    outputs: list
    error: str | None
    description_suffix: str

    @classmethod
    def of(cls, j: Job) -> "JobOut":
        return cls(**{k: getattr(j, k) for k in cls.model_fields})


def _tokens() -> dict[str, str]:
    raw = settings().api_tokens
    return json.loads(raw) if raw else {}


def create_app(store: JobStore | None = None, disp: Dispatcher | None = None) -> FastAPI:
    """The API app; ``store``/``disp`` default to the process-wide ones."""
    app = FastAPI(title="sprim", description=__doc__, version="1")
    bearer = HTTPBearer(auto_error=False)

    def get_store() -> JobStore:
        return store or open_store()

    def institution(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> str:
        if cred is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "token required", {"WWW-Authenticate": "Bearer"}
            )
        for tok, inst in _tokens().items():
            if hmac.compare_digest(tok.encode(), cred.credentials.encode()):
                return inst
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid token", {"WWW-Authenticate": "Bearer"}
        )

    Inst = Annotated[str, Depends(institution)]
    Store = Annotated[JobStore, Depends(get_store)]

    def _job(s: JobStore, job_id: int, inst: str) -> Job:
        j = s.get(job_id)
        if j is None or not visible(j, inst):
            raise HTTPException(404, f"job {job_id} not found")
        return j

    @app.get("/health", tags=["meta"])
    def health() -> dict:
        return {"ok": True}

    @app.get("/jobs", response_model=list[JobOut], tags=["jobs"])
    def list_jobs(
        inst: Inst, s: Store, state: JobState | None = None,
        study_uid: str | None = None, limit: int = Query(100, le=1000),
    ) -> list[JobOut]:  # fmt: skip
        only = None if inst == "*" else inst
        return [
            JobOut.of(j)
            for j in s.list(state=state, institution=only, study_uid=study_uid, limit=limit)
        ]

    @app.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    def get_job(job_id: int, inst: Inst, s: Store) -> JobOut:
        return JobOut.of(_job(s, job_id, inst))

    @app.get("/jobs/{job_id}/audit", tags=["jobs"])
    def job_audit(job_id: int, inst: Inst, s: Store) -> list[dict]:
        _job(s, job_id, inst)
        return [a.__dict__ for a in s.audit_trail(job_id=job_id)]

    def _action(fn, s: JobStore, job_id: int, inst: str, **kw) -> JobOut:
        try:
            return JobOut.of(fn(s, job_id, actor=f"api:{inst}", institution=inst, **kw))
        except NotFound as e:
            raise HTTPException(404, str(e)) from None
        except BadRequest as e:
            raise HTTPException(409, str(e)) from None

    @app.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
    def cancel_job(job_id: int, inst: Inst, s: Store) -> JobOut:
        return _action(cancel, s, job_id, inst)

    @app.post("/jobs/{job_id}/retry", response_model=JobOut, tags=["jobs"])
    def retry_job(job_id: int, inst: Inst, s: Store) -> JobOut:
        return _action(retry, s, job_id, inst, disp=disp)

    @app.post(
        "/studies/{study_uid}/reprocess", response_model=JobOut, status_code=202, tags=["reprocess"]
    )
    def reprocess_study(study_uid: str, req: ReprocessRequest, inst: Inst, s: Store) -> JobOut:
        """Same params as before replace the earlier outputs; others add a new series."""
        try:
            job = reprocess(
                s, study_uid, [{"use": st.use, "with": st.with_} for st in req.steps],
                requester=f"{req.requester}@{inst}", institution=inst, series_uid=req.series_uid,
                priority={"urgent": 2, "normal": 1, "low": 0}[req.priority], disp=disp,
            )  # fmt: skip
        except NotFound as e:
            raise HTTPException(404, str(e)) from None
        except BadRequest as e:
            raise HTTPException(422, str(e)) from None
        return JobOut.of(job)

    @app.get("/studies/{study_uid}/jobs", response_model=list[JobOut], tags=["jobs"])
    def study_jobs(study_uid: str, inst: Inst, s: Store) -> list[JobOut]:
        jobs = [j for j in s.list(study_uid=study_uid, limit=1000) if visible(j, inst)]
        if not jobs:
            raise HTTPException(404, f"study {study_uid} not found")
        return [JobOut.of(j) for j in jobs]

    return app
