"""REST API: jobs and reprocessing on request (FastAPI; OpenAPI docs at ``/docs``).

Every request carries ``Authorization: Bearer <token>``; tokens map to an institution
(``SPRIM_API_TOKENS``, JSON ``{"token": "institution"}``, ``"*"`` = all). A token sees and
reprocesses only its institution's studies: 401 without a valid token, 404 for another
institution's job or study (existence is not revealed). A reprocess names only series of that
study. Requests are bounded: bodies of at most 64 kB (413), at most 16 steps of 32 params each,
ids and UIDs checked for form (422); params whose output would exceed ``SPRIM_MAX_VOLUME_MB``
for the study's series are refused (422) before a job exists. A job store that cannot answer
gives 503 with one line saying where and why.

The web console (:mod:`workers.interfaces.console`) is mounted on the same app under
``/console`` (``/`` redirects there), with the same tokens and the same authorization.

``/docs``, ``/openapi.json`` and ``/health`` answer without a token: they describe the
interface only (no study, job, institution or token), and the browser page must load the
schema before anyone can paste a token into it.
"""

from typing import Annotated, Any, Literal

from fastapi import (
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
    status,
)
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from workers.core.metrics import StoreCensus, exposition
from workers.interfaces.auth import PRIORITIES, UID_PATTERN, institution_for
from workers.platform.dispatcher import Dispatcher
from workers.platform.jobstore import STATES, UNREACHABLE, Job, JobStore, open_store, unreachable
from workers.platform.reprocess import BadRequest, NotFound, cancel, reprocess, retry, visible

JobState = Literal[STATES]  # type: ignore[valid-type]

MAX_BODY_BYTES = 64 * 1024
MAX_STEPS = 16
MAX_PARAMS = 32
Uid = Annotated[str, Field(max_length=64, pattern=UID_PATTERN)]
#: Job ids are 32-bit in the store: larger or negative ids are malformed, not missing.
JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]
StudyUid = Annotated[str, Path(max_length=64, pattern=UID_PATTERN)]


class StepRequest(BaseModel):
    use: str = Field(..., max_length=64, description="Registered step name, e.g. reformat.mpr.")
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with", max_length=MAX_PARAMS, description="Params to change."
    )


class ReprocessRequest(BaseModel):
    steps: list[StepRequest] = Field(..., min_length=1, max_length=MAX_STEPS)
    series_uid: Uid | None = Field(
        None, description="A series of this study. Default: the series processed before."
    )
    priority: str = Field("urgent", pattern="^(urgent|normal|low)$")
    requester: str = Field(
        "api", max_length=64, pattern=r"^[\w .@:-]+$", description="Who asks (audit trail)."
    )


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413): by Content-Length, and as they stream."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            total += len(msg.get("body", b""))
            if total > self.max_bytes:
                return await self._too_large(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        body: dict | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            if body is not None:
                out, body = body, None
                return out
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        detail = f"request body larger than {self.max_bytes // 1024} kB (or bad Content-Length)"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


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


bearer = HTTPBearer(auto_error=False)


def institution(cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The institution of the request's bearer token (401 without a valid one)."""
    if cred is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "token required", {"WWW-Authenticate": "Bearer"}
        )
    inst = institution_for(cred.credentials)
    if inst is not None:
        return inst
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED, "invalid token", {"WWW-Authenticate": "Bearer"}
    )


def get_store(request: Request) -> JobStore:
    """The job store given to :func:`create_app`, else the process-wide one."""
    return request.app.state.job_store or open_store()


def get_dispatcher(request: Request) -> Dispatcher | None:
    """The dispatcher given to :func:`create_app` (None: the process-wide one)."""
    return request.app.state.dispatcher


Inst = Annotated[str, Depends(institution)]
Store = Annotated[JobStore, Depends(get_store)]
Disp = Annotated[Dispatcher | None, Depends(get_dispatcher)]


async def store_unreachable(request: Request, exc: Exception) -> JSONResponse:
    """503 with one line saying where the job store is and why it cannot answer."""
    store = request.app.state.job_store
    return JSONResponse({"detail": unreachable(exc, store.url if store else None)}, 503)


def _job(s: JobStore, job_id: int, inst: str) -> Job:
    j = s.get(job_id)
    if j is None or not visible(j, inst):
        raise HTTPException(404, f"job {job_id} not found")
    return j


def _action(fn, s: JobStore, job_id: int, inst: str, **kw) -> JobOut:
    try:
        return JobOut.of(fn(s, job_id, actor=f"api:{inst}", institution=inst, **kw))
    except NotFound as e:
        raise HTTPException(404, str(e)) from None
    except BadRequest as e:
        raise HTTPException(409, str(e)) from None


def health() -> dict:
    return {"ok": True}


def prometheus_metrics(inst: Inst, request: Request) -> Response:
    """Prometheus exposition (``workers.core.metrics``), the job store's census included.
    It covers every institution: a ``*`` token only (Prometheus: ``authorization``)."""
    if inst != "*":
        raise HTTPException(403, "metrics cover every institution: a '*' token is needed")
    # the store is opened by the census: a store that cannot answer is a metric, not a 503
    body = exposition(StoreCensus(lambda: get_store(request).census()))
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


def list_jobs(
    inst: Inst, s: Store, state: JobState | None = None,
    study_uid: Annotated[str | None, Query(max_length=64, pattern=UID_PATTERN)] = None,
    limit: int = Query(100, ge=1, le=1000),
) -> list[JobOut]:  # fmt: skip
    only = None if inst == "*" else inst
    return [
        JobOut.of(j)
        for j in s.list(state=state, institution=only, study_uid=study_uid, limit=limit)
    ]


def get_job(job_id: JobId, inst: Inst, s: Store) -> JobOut:
    return JobOut.of(_job(s, job_id, inst))


def job_audit(job_id: JobId, inst: Inst, s: Store) -> list[dict]:
    _job(s, job_id, inst)
    return [a.__dict__ for a in s.audit_trail(job_id=job_id)]


def cancel_job(job_id: JobId, inst: Inst, s: Store) -> JobOut:
    return _action(cancel, s, job_id, inst)


def retry_job(job_id: JobId, inst: Inst, s: Store, disp: Disp) -> JobOut:
    return _action(retry, s, job_id, inst, disp=disp)


def reprocess_study(
    study_uid: StudyUid, req: ReprocessRequest, inst: Inst, s: Store, disp: Disp
) -> JobOut:
    """Same params as before replace the earlier outputs; others add a new series."""
    try:
        job = reprocess(
            s, study_uid, [{"use": st.use, "with": st.with_} for st in req.steps],
            requester=f"{req.requester}@{inst}", institution=inst, series_uid=req.series_uid,
            priority=PRIORITIES[req.priority], disp=disp,
        )  # fmt: skip
    except NotFound as e:
        raise HTTPException(404, str(e)) from None
    except BadRequest as e:
        raise HTTPException(422, str(e)) from None
    return JobOut.of(job)


def study_jobs(study_uid: StudyUid, inst: Inst, s: Store) -> list[JobOut]:
    jobs = [j for j in s.list(study_uid=study_uid, limit=1000) if visible(j, inst)]
    if not jobs:
        raise HTTPException(404, f"study {study_uid} not found")
    return [JobOut.of(j) for j in jobs]


def add_api_routes(app: FastAPI) -> None:
    """The endpoints, each on ``app`` itself (``app.routes`` lists them all: the authz tests walk
    it; FastAPI 0.165 lists an included router there as one entry, not its routes)."""
    route = app.add_api_route
    route("/health", health, methods=["GET"], tags=["meta"])
    route("/metrics", prometheus_metrics, methods=["GET"], tags=["meta"], response_class=Response)
    route("/jobs", list_jobs, methods=["GET"], response_model=list[JobOut], tags=["jobs"])
    route("/jobs/{job_id}", get_job, methods=["GET"], response_model=JobOut, tags=["jobs"])
    route("/jobs/{job_id}/audit", job_audit, methods=["GET"], tags=["jobs"])
    route("/jobs/{job_id}/cancel", cancel_job, methods=["POST"], response_model=JobOut,
          tags=["jobs"])  # fmt: skip
    route("/jobs/{job_id}/retry", retry_job, methods=["POST"], response_model=JobOut,
          tags=["jobs"])  # fmt: skip
    route("/studies/{study_uid}/reprocess", reprocess_study, methods=["POST"],
          response_model=JobOut, status_code=202, tags=["reprocess"])  # fmt: skip
    route("/studies/{study_uid}/jobs", study_jobs, methods=["GET"],
          response_model=list[JobOut], tags=["jobs"])  # fmt: skip


def create_app(
    store: JobStore | None = None, disp: Dispatcher | None = None, *, console: bool = True
) -> FastAPI:
    """The API app, with the web console under ``/console`` (``console=False``: API only);
    ``store``/``disp`` default to the process-wide ones."""
    app = FastAPI(title="sprim", description=__doc__, version="1")
    app.state.job_store, app.state.dispatcher = store, disp
    app.add_middleware(BodyLimit)
    for exc_type in UNREACHABLE:
        app.add_exception_handler(exc_type, store_unreachable)
    add_api_routes(app)
    if console:
        from workers.interfaces.console import mount_console

        mount_console(app, store, disp)
    return app
