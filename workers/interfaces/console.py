"""The web console: jobs, studies with previews and a reprocess form, failures, rules, load.

Server-rendered (Jinja2, every value escaped) on the API's FastAPI app under ``/console``; no
JavaScript build: one small static script refreshes tables in place. Same tokens and the same
authorization as the API (:mod:`workers.interfaces.auth`): a session sees only its token's
institution — another institution's study or job is "not found", exactly as a missing one —
and ``*`` sees all. Every state change is a POST carrying a per-session CSRF token; the session
cookie is HttpOnly and SameSite=Strict. Pages send a Content-Security-Policy that allows no
inline script, so a DICOM string that slipped through escaping would still not run.
"""

from __future__ import annotations

import enum
import json
import re
import statistics
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from pydantic import BaseModel
from sqlalchemy import func, or_, select

from workers.interfaces import auth
from workers.interfaces.previews import output_previews, preview_file
from workers.platform.dispatcher import Dispatcher
from workers.platform.jobstore import (
    ACTIVE,
    STATES,
    UNREACHABLE,
    Job,
    JobRow,
    JobStore,
    open_store,
    unreachable,
)
from workers.platform.reprocess import (
    BadRequest,
    NotFound,
    cancel,
    reprocess,
    retry,
    visible,
    visible_row,
)

HERE = Path(__file__).parent
COOKIE = "sprim_session"
PREFIX = "/console"
#: Time windows of the jobs filter.
WINDOWS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
#: Jobs listed at most on the jobs page (newest first).
JOBS_SHOWN = 200
#: Seconds between refreshes of an auto-refreshing table.
REFRESH_S = 3
_UID = re.compile(auth.UID_PATTERN)
_FLASH = re.compile(r"^(queued|retried|cancelled)-(\d{1,10})$")
#: Units of params by name suffix (the registry's naming convention: ``thickness_mm``).
UNITS = {
    "_mm2": "mm²", "_mm": "mm", "_hu": "HU", "_ml": "mL", "_deg": "degrees", "_s": "s",
    "_mb": "MB", "_px": "px", "_pct": "%",
}  # fmt: skip


# -- templates ---------------------------------------------------------------------------------
def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _secs(s: float | None) -> str:
    if s is None:
        return ""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


TEMPLATES = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
TEMPLATES.filters.update(when=_when, secs=_secs)
TEMPLATES.globals.update(prefix=PREFIX, refresh_s=REFRESH_S)

#: Content-Security-Policy of every console response: no inline script or style, nothing
#: from elsewhere, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


# -- sessions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Session:
    institution: str
    cookie: str

    @property
    def csrf(self) -> str:
        return auth.csrf_token(self.cookie)

    @property
    def all(self) -> bool:
        return self.institution == "*"


class LoginRequired(Exception):
    pass


class Refused(Exception):
    """A state change without this session's CSRF token, or posted from another site."""


class Missing(Exception):
    """A study or job that does not exist for this session (never says whose it is)."""

    def __init__(self, what: str, message: str | None = None) -> None:
        super().__init__(what)
        self.message = message or f"{what} not found"


def _session(request: Request) -> Session:
    cookie = request.cookies.get(COOKIE)
    inst = auth.session_institution(cookie)
    if inst is None or cookie is None:
        raise LoginRequired()
    return Session(inst, cookie)


def _maybe_session(request: Request) -> Session | None:
    try:
        return _session(request)
    except LoginRequired:
        return None


async def _form(request: Request) -> dict[str, list[str]]:
    """The url-encoded body of a form POST (the only encoding the console's forms use)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        return {}
    body = (await request.body()).decode("utf-8", "replace")
    return parse_qs(body, keep_blank_values=True, max_num_fields=500)


def _one(form: dict[str, list[str]], key: str, default: str = "") -> str:
    return (form.get(key) or [default])[0]


def _same_origin(request: Request) -> bool:
    """A form POST that says where it comes from must come from this host."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return origin.split("://", 1)[-1] == request.headers.get("host", "")


# -- queries -----------------------------------------------------------------------------------
def _visible_q(q, s: Session):
    return q if s.all else q.where(JobRow.institution == s.institution)


def query_jobs(
    store: JobStore,
    s: Session,
    *,
    state: str | None = None,
    rule: str | None = None,
    institution: str | None = None,
    since_s: float | None = None,
    limit: int = 200,
) -> list[Job]:
    """Jobs this session sees, newest first, filtered."""
    q = _visible_q(select(JobRow), s)
    if state:
        q = q.where(JobRow.state == state)
    if rule:
        q = q.where(JobRow.rule == rule)
    if institution and s.all:
        q = q.where(JobRow.institution == institution)
    if since_s:
        q = q.where(JobRow.created_at >= time.time() - since_s)
    q = q.order_by(JobRow.id.desc()).limit(limit)
    with store.Session() as ses:
        return [Job.of(r) for r in ses.scalars(q)]


def _distinct(store: JobStore, s: Session, column) -> list[str]:
    q = _visible_q(select(column).distinct(), s).where(column.is_not(None)).order_by(column)
    with store.Session() as ses:
        return [str(v) for v in ses.scalars(q)]


def load_by_institution(store: JobStore, s: Session, now: float | None = None) -> list[dict]:
    """Per institution: queued, running, done/partial/failed in the last 24 h, median
    turnaround (created -> finished) of the jobs done in the last 24 h."""
    now = now or time.time()
    since = now - 86400
    rows: dict[str, dict] = {}

    def row(inst: str) -> dict:
        return rows.setdefault(inst, {
            "institution": inst, "queued": 0, "running": 0, "done": 0, "partial": 0,
            "failed": 0, "turnaround": [], "oldest_queued": None,
        })  # fmt: skip

    with store.Session() as ses:
        counts = ses.execute(
            _visible_q(select(JobRow.institution, JobRow.state, func.count(), func.min(JobRow.created_at)), s)
            .where(or_(JobRow.state.in_(ACTIVE),
                       (JobRow.state.in_(("done", "partial", "failed"))) & (JobRow.finished_at >= since)))
            .group_by(JobRow.institution, JobRow.state)
        ).all()  # fmt: skip
        done = ses.execute(
            _visible_q(select(JobRow.institution, JobRow.created_at, JobRow.finished_at), s).where(
                JobRow.state == "done", JobRow.finished_at >= since
            )
        ).all()
    for inst, state, n, oldest in counts:
        r = row(inst)
        r[state] = n
        if state == "queued":
            r["oldest_queued"] = now - oldest
    for inst, created, finished in done:
        row(inst)["turnaround"].append(finished - created)
    out = []
    for r in sorted(rows.values(), key=lambda r: r["institution"]):
        t = r.pop("turnaround")
        r["median_turnaround"] = statistics.median(t) if t else None
        out.append(r)
    return out


@dataclass
class StudyView:
    study_uid: str
    institution: str
    series: list[dict]
    jobs: list[Job]
    context: dict = field(default_factory=dict)


def study_view(store: JobStore, s: Session, study_uid: str) -> StudyView:
    """The study as this session may see it; :class:`Missing` otherwise (same as no study)."""
    if not _UID.fullmatch(study_uid) or len(study_uid) > 64:
        raise Missing(f"study {study_uid[:64]}")
    row = store.study(study_uid)
    jobs = [j for j in store.list(study_uid=study_uid, limit=1000) if visible(j, s.institution)]
    owned = visible_row(row, s.institution) if row is not None and row.institution else bool(jobs)
    if not owned:
        raise Missing(f"study {study_uid}")
    series = sorted(
        (dict(x) for x in (row.series or [])) if row is not None else [],
        key=lambda x: (_num(x.get("SeriesNumber")), str(x.get("SeriesInstanceUID", ""))),
    )
    inst = (row.institution if row is not None and row.institution else None) or (
        jobs[0].institution if jobs else ""
    )
    return StudyView(study_uid, inst, series, jobs, dict(row.context or {}) if row else {})


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("inf")


def _job(store: JobStore, s: Session, job_id: int) -> Job:
    j = store.get(job_id) if 1 <= job_id <= 2**31 - 1 else None
    if j is None or not visible(j, s.institution):
        raise Missing(f"job {job_id}")
    return j


def _applies(rule: Any, s: Session) -> bool:
    """A rule that can run for this session's institution: one that names other institutions
    only (in ``institution`` / InstitutionName conditions) is not shown to a site's token."""
    if s.all:
        return True
    for c in (*rule.match, *rule.where):
        if c.key in ("institution", "InstitutionName") and not c.test({c.key: s.institution}):
            return False
    return True


# -- the reprocess form, generated from a step's params model -----------------------------------
@dataclass
class ParamField:
    """One input of a reprocess form."""

    name: str
    kind: str  # number | integer | text | choice | choices | bool | yaml
    label: str
    unit: str
    description: str
    default: str
    bounds: str
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    optional: bool = False
    options: list[str] = field(default_factory=list)
    value: str | list[str] = ""
    error: str = ""


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return (inner[0] if len(inner) == 1 else annotation), len(inner) < len(args)
    return annotation, False


def _literal_options(t: Any) -> list[str] | None:
    if typing.get_origin(t) is typing.Literal:
        return [str(a) for a in typing.get_args(t)]
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return [str(m.value) for m in t]
    return None


def _shown(v: Any) -> str:
    """A param value as its input shows it (and as a submitted value is compared with it)."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) < 1e15 else repr(v)
    if isinstance(v, list | tuple):
        return json.dumps(list(v))
    return str(getattr(v, "value", v))


def unit_of(name: str, description: str = "") -> str:
    for suffix, unit in UNITS.items():
        if name.endswith(suffix):
            return unit
    m = re.search(r"\(([^()]{1,12})\)", description)
    return m.group(1) if m and m.group(1) not in ("unitless",) and " " not in m.group(1) else ""


def param_fields(model: type[BaseModel], current: dict[str, Any]) -> list[ParamField]:
    """The inputs of ``model``'s form, showing ``current`` values (the study's, else defaults)."""
    from pipelines.registry import param_range

    out = []
    for name, f in model.model_fields.items():
        t, optional = _unwrap(f.annotation)
        bounds = param_range(f)
        lo = hi = None
        max_len = None
        for m in f.metadata:
            lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
            lo = getattr(m, "gt", None) if getattr(m, "gt", None) is not None else lo
            hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
            hi = getattr(m, "lt", None) if getattr(m, "lt", None) is not None else hi
            max_len = getattr(m, "max_length", None) or max_len
        default = f.get_default(call_default_factory=True)
        value = current.get(name, default)
        options = _literal_options(t)
        seq = typing.get_origin(t) in (tuple, list)
        item_opts = _literal_options(typing.get_args(t)[0]) if seq and typing.get_args(t) else None
        if t is bool:
            kind, options = "bool", ["true", "false"]
        elif options is not None:
            kind = "choice"
        elif item_opts is not None:
            kind, options = "choices", item_opts
        elif t is int:
            kind = "integer"
        elif t is float:
            kind = "number"
        elif t is str:
            kind = "text"
        else:
            kind = "yaml"
        desc = f.description or ""
        shown: str | list[str]
        if kind == "choices":
            shown = [str(getattr(v, "value", v)) for v in (value or ())]
        else:
            shown = _shown(value)
        out.append(ParamField(
            name=name, kind=kind, label=name.replace("_", " "), unit=unit_of(name, desc),
            description=desc, default=_shown(default) if default is not None else "(none)",
            bounds=bounds, minimum=lo, maximum=hi, max_length=max_len, optional=optional,
            options=options or [], value=shown,
        ))  # fmt: skip
    return out


def changed_params(fields: list[ParamField], form: dict[str, list[str]]) -> dict[str, Any]:
    """The params whose submitted value differs from what the form showed (only those are sent:
    the others keep the values the study was processed with, as in the API)."""
    import yaml

    out: dict[str, Any] = {}
    for f in fields:
        key = f"p.{f.name}"
        if f.kind == "choices":
            if _one(form, f"has.{f.name}") != "1":
                continue
            got: Any = [v for v in form.get(key, []) if v]
            if sorted(got) != sorted(f.value):
                out[f.name] = got
            continue
        if key not in form:
            continue
        raw = _one(form, key).strip()
        if raw == f.value:
            continue
        if raw == "" and f.optional:
            out[f.name] = None
        elif f.kind == "yaml":
            try:
                out[f.name] = yaml.safe_load(raw)
            except yaml.YAMLError:
                out[f.name] = raw  # pydantic says what it should be
        else:
            out[f.name] = raw  # pydantic converts "5" to 5.0 and refuses "abc" by name
    return out


@dataclass
class StepForm:
    step: str
    version: str
    summary: str
    fields: list[ParamField]
    error: str = ""
    series_uid: str = ""


def _processed(view: StudyView) -> list[Job]:
    return [j for j in view.jobs if j.state != "no_match" and j.series_uid]


def step_form(view: StudyView, name: str, series_uid: str | None = None) -> StepForm:
    """The reprocess form of step ``name`` on the study, prefilled with the params the series
    ran with (newest job first), else the step's defaults."""
    from pipelines import get_step

    st = get_step(name)
    ran = _processed(view)
    series_uid = series_uid or (ran[0].series_uid if ran else None) or ""
    base: dict[str, Any] = {}
    for j in ran:
        hit = next((x for x in j.steps if x.get("use") == st.name), None)
        if hit and j.series_uid == series_uid:
            base = dict(hit.get("with") or {})
            break
    try:
        current = st.validate(base).model_dump(mode="json")
    except Exception:  # noqa: BLE001  (params of an older step version: show the defaults)
        current = {}
    return StepForm(st.name, st.version, st.summary, param_fields(st.params, current),
                    series_uid=series_uid)  # fmt: skip


def study_step_names(view: StudyView) -> list[str]:
    """Steps that ran on the study, newest first, each once."""
    names: list[str] = []
    for j in _processed(view):
        for x in j.steps:
            if x.get("use") and x["use"] not in names:
                names.append(x["use"])
    return names


# -- the app -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """The job store and dispatcher the console reads and acts on (the API's)."""

    job_store: JobStore | None = None  # None: the process-wide store
    disp: Dispatcher | None = None

    def store(self) -> JobStore:
        """Called where a handler first needs the store (mostly after its session check: a
        visitor without a session is sent to log in even while the store is down)."""
        return self.job_store or open_store()


def _backend(request: Request) -> Backend:
    return request.app.state.backend


ConsoleBackend = Annotated[Backend, Depends(_backend)]
#: The console's routes (relative to ``/console``); :func:`mount_console` includes them.
pages = APIRouter()


def page(request: Request, name: str, s: Session | None, status: int = 200, **ctx) -> HTMLResponse:
    html = TEMPLATES.get_template(name).render(
        session=s, path=request.url.path, query=str(request.url.query), **ctx
    )
    return HTMLResponse(html, status_code=status)


async def _security_headers(request: Request, call_next):
    """Every console response: the CSP, no MIME sniffing or framing, not cached by default."""
    resp = await call_next(request)
    resp.headers.setdefault("Content-Security-Policy", CSP)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers.setdefault("Cache-Control", "no-store")
    return resp


async def _login_required(request: Request, _e: Exception) -> Response:
    if request.method != "GET" or request.url.path.startswith(f"{PREFIX}/fragments"):
        return HTMLResponse("login required", status_code=401)
    nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': nxt})}", status_code=303)


async def _missing(request: Request, e: Exception) -> Response:
    msg = e.message if isinstance(e, Missing) else "not found"
    return page(request, "error.html", _maybe_session(request), 404, title="Not found",
                message=msg)  # fmt: skip


async def _store_down(request: Request, exc: Exception) -> Response:
    store = _store_or_none(_backend(request))
    msg = unreachable(exc, store.url if store else None)
    return page(request, "error.html", _maybe_session(request), 503,
                title="Job store unreachable", message=msg)  # fmt: skip


def _store_or_none(backend: Backend) -> JobStore | None:
    try:
        return backend.store()
    except Exception:  # noqa: BLE001
        return None


async def _refused(request: Request, _e: Exception) -> Response:
    return page(request, "error.html", _maybe_session(request), 403, title="Refused",
                message="the form was not sent from this console (CSRF check failed); "
                "reload the page and try again")  # fmt: skip


def _check_post(request: Request, s: Session, form: dict[str, list[str]]) -> None:
    if not _same_origin(request) or not auth.csrf_ok(s.cookie, _one(form, "csrf")):
        raise Refused()


# -- login ------------------------------------------------------------------------------------
def _next(raw: str) -> str:
    """Only a console path (never another site) after login or an action."""
    if raw.startswith(f"{PREFIX}/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return f"{PREFIX}/jobs"


def _no_tokens() -> str:
    return "" if auth.tokens() else "no tokens are configured: set SPRIM_API_TOKENS"


@pages.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "") -> HTMLResponse:
    return page(request, "login.html", None, next=_next(next), error=_no_tokens())


@pages.post("/login")
async def login(request: Request) -> Response:
    form = await _form(request)
    nxt = _next(_one(form, "next"))
    token = _one(form, "token").strip()
    if not _same_origin(request):
        raise Refused()
    if not token or len(token) > 512 or auth.institution_for(token) is None:
        return page(request, "login.html", None, 401, next=nxt,
                    error=_no_tokens() or "unknown token")  # fmt: skip
    resp = RedirectResponse(nxt, status_code=303)
    resp.set_cookie(
        COOKIE, auth.session_cookie(token), max_age=auth.SESSION_S, path=PREFIX,
        httponly=True, samesite="strict", secure=request.url.scheme == "https",
    )  # fmt: skip
    return resp


@pages.post("/logout")
async def logout(request: Request) -> Response:
    s = _session(request)
    _check_post(request, s, await _form(request))
    resp = RedirectResponse(f"{PREFIX}/login", status_code=303)
    resp.delete_cookie(COOKIE, path=PREFIX)
    return resp


@pages.get("/")
def home() -> Response:
    return RedirectResponse(f"{PREFIX}/jobs", status_code=303)


# -- jobs -------------------------------------------------------------------------------------
def _filters(s: Session, state: str, rule: str, institution: str, since: str) -> dict:
    return {
        "state": state if state in STATES else "",
        "rule": rule[:128],
        "institution": institution[:128] if s.all else "",
        "since": since if since in WINDOWS else "",
    }


def _jobs_ctx(request: Request, store: JobStore, s: Session, f: dict, refresh: str) -> dict:
    jobs = query_jobs(store, s, state=f["state"] or None, rule=f["rule"] or None,
                      institution=f["institution"] or None,
                      since_s=WINDOWS.get(f["since"]), limit=JOBS_SHOWN)  # fmt: skip
    return {
        "jobs": jobs, "filters": f, "states": STATES, "windows": list(WINDOWS),
        "rules": _distinct(store, s, JobRow.rule),
        "institutions": _distinct(store, s, JobRow.institution) if s.all else [],
        "refresh": refresh != "0", "flash": _flash(request), "limit": JOBS_SHOWN,
        "fragment": f"{PREFIX}/fragments/jobs?" + urlencode({k: v for k, v in f.items() if v}),
    }  # fmt: skip


@pages.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, backend: ConsoleBackend, state: str = "", rule: str = "",
              institution: str = "", since: str = "", refresh: str = "1") -> HTMLResponse:  # fmt: skip
    s = _session(request)
    f = _filters(s, state, rule, institution, since)
    ctx = _jobs_ctx(request, backend.store(), s, f, refresh)
    return page(request, "jobs.html", s, title="Jobs", **ctx)


@pages.get("/fragments/jobs", response_class=HTMLResponse)
def jobs_fragment(request: Request, backend: ConsoleBackend, state: str = "", rule: str = "",
                  institution: str = "", since: str = "") -> HTMLResponse:  # fmt: skip
    s = _session(request)
    f = _filters(s, state, rule, institution, since)
    return page(request, "_jobs_table.html", s, **_jobs_ctx(request, backend.store(), s, f, "1"))


def _flash(request: Request) -> str:
    m = _FLASH.match(request.query_params.get("ok", ""))
    return f"job {m.group(2)} {m.group(1)}" if m else ""


# -- a study ----------------------------------------------------------------------------------
def _study_ctx(store: JobStore, view: StudyView, extra_step: str = "",
               forms: dict[str, StepForm] | None = None) -> dict:  # fmt: skip
    from pipelines import all_steps

    built = {n: (forms or {}).get(n) or step_form(view, n) for n in _form_steps(view, extra_step)}
    known = {str(x.get("SeriesInstanceUID")): x for x in view.series}
    for j in _processed(view):
        known.setdefault(str(j.series_uid), {"SeriesInstanceUID": j.series_uid})
    audits = {j.id: store.audit_trail(job_id=j.id) for j in view.jobs}
    outputs = [(j, o, output_previews(j, o)) for j in view.jobs for o in (j.outputs or [])]
    return {
        "view": view, "forms": built, "series_choices": list(known.values()),
        "all_steps": [x.name for x in all_steps() if x.name not in built],
        "audits": audits, "outputs": outputs,
        "active": sum(j.state in ACTIVE for j in view.jobs),
        "fragment": f"{PREFIX}/fragments/studies/{view.study_uid}/jobs",
    }  # fmt: skip


def _form_steps(view: StudyView, extra_step: str) -> list[str]:
    """Steps that get a reprocess form: those that ran on the study, and ``extra_step`` (the
    one asked for by ``?step=``) when it is a registered step."""
    from pipelines import get_step

    names = study_step_names(view)
    if extra_step and extra_step not in names:
        try:
            get_step(extra_step)
            names.append(extra_step)
        except KeyError:
            pass
    return names


@pages.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, study_uid: str, backend: ConsoleBackend,
               step: str = "") -> HTMLResponse:  # fmt: skip
    s = _session(request)
    store = backend.store()
    view = study_view(store, s, study_uid)
    return page(request, "study.html", s, title=f"Study {study_uid}", flash=_flash(request),
                **_study_ctx(store, view, step[:64]))  # fmt: skip


@pages.get("/fragments/studies/{study_uid}/jobs", response_class=HTMLResponse)
def study_jobs_fragment(request: Request, study_uid: str, backend: ConsoleBackend) -> HTMLResponse:
    s = _session(request)
    store = backend.store()
    view = study_view(store, s, study_uid)
    return page(request, "_study_jobs.html", s, view=view,
                active=sum(j.state in ACTIVE for j in view.jobs),
                audits={j.id: store.audit_trail(job_id=j.id) for j in view.jobs})  # fmt: skip


@pages.post("/studies/{study_uid}/reprocess")
async def study_reprocess(request: Request, study_uid: str, backend: ConsoleBackend) -> Response:
    s = _session(request)
    form = await _form(request)
    _check_post(request, s, form)
    store = backend.store()
    view = study_view(store, s, study_uid)
    name = _one(form, "step")[:64]
    series_uid = _one(form, "series_uid")[:64] or None
    priority = _one(form, "priority", "urgent")
    try:
        sf = step_form(view, name, series_uid)
    except KeyError:
        raise Missing(f"step {name}") from None
    with_ = changed_params(sf.fields, form)
    try:
        if priority not in auth.PRIORITIES:
            raise BadRequest(f"priority {priority!r}: one of {', '.join(auth.PRIORITIES)}")
        job = reprocess(
            store, study_uid, [{"use": sf.step, "with": with_}],
            requester=f"console@{s.institution}", institution=s.institution,
            series_uid=series_uid, priority=auth.PRIORITIES[priority], disp=backend.disp,
        )  # fmt: skip
    except NotFound as e:  # words of reprocess(): the same for another's study as for none
        raise Missing(f"study {study_uid}", str(e)) from None
    except BadRequest as e:
        _refused_form(sf, form, e)
        return page(request, "study.html", s, 422, title=f"Study {study_uid}", flash="",
                    **_study_ctx(store, view, sf.step, {sf.step: sf}))  # fmt: skip
    return RedirectResponse(
        f"{PREFIX}/studies/{study_uid}?ok=queued-{job.id}#job-{job.id}", status_code=303
    )


def _refused_form(sf: StepForm, form: dict[str, list[str]], e: BadRequest) -> None:
    """The form shown again: what was typed stays in it, each error next to its input."""
    for f in sf.fields:
        if f.kind == "choices":
            if _one(form, f"has.{f.name}") == "1":
                f.value = [v for v in form.get(f"p.{f.name}", []) if v]
        elif f"p.{f.name}" in form:
            f.value = _one(form, f"p.{f.name}")
        f.error = e.fields.get(f.name, "")
    marked = e.fields and set(e.fields) <= {f.name for f in sf.fields}
    sf.error = "fix the values marked below" if marked else str(e)


@pages.get("/jobs/{job_id}")
def job_page(request: Request, job_id: int, backend: ConsoleBackend) -> Response:
    """A job is shown on its study's page."""
    j = _job(backend.store(), _session(request), job_id)
    return RedirectResponse(f"{PREFIX}/studies/{j.study_uid}#job-{j.id}", status_code=303)


# -- previews ---------------------------------------------------------------------------------
@pages.get("/jobs/{job_id}/previews/{name}")
def preview(request: Request, job_id: int, name: str, backend: ConsoleBackend) -> Response:
    s = _session(request)
    job = _job(backend.store(), s, job_id)
    found = preview_file(job, name)
    if found is None:
        raise Missing(f"preview {name[:80]}")
    path, media = found
    return FileResponse(path, media_type=media, headers={"Cache-Control": "private, max-age=3600"})


# -- failures ---------------------------------------------------------------------------------
def _failures_ctx(request: Request, store: JobStore, s: Session) -> dict:
    now = time.time()
    failed = query_jobs(store, s, state="failed", limit=200)
    partial = query_jobs(store, s, state="partial", limit=200)
    waiting = [j for j in query_jobs(store, s, state="queued", limit=500) if j.error]
    stuck = [j for j in query_jobs(store, s, state="running", limit=500)
             if (j.lease_expires_at or now) < now]  # fmt: skip
    return {"failed": sorted(failed + partial, key=lambda j: -j.id), "waiting": waiting,
            "stuck": stuck, "flash": _flash(request), "error": ""}  # fmt: skip


@pages.get("/failures", response_class=HTMLResponse)
def failures_page(request: Request, backend: ConsoleBackend) -> HTMLResponse:
    s = _session(request)
    ctx = _failures_ctx(request, backend.store(), s)
    return page(request, "failures.html", s, title="Failures", **ctx)


@pages.post("/jobs/{job_id}/retry")
async def retry_job(request: Request, job_id: int, backend: ConsoleBackend) -> Response:
    return await _job_action(request, backend, job_id, partial(retry, disp=backend.disp), "retried")


@pages.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: int, backend: ConsoleBackend) -> Response:
    return await _job_action(request, backend, job_id, cancel, "cancelled")


async def _job_action(
    request: Request, backend: Backend, job_id: int, action: Callable[..., Job], verb: str
) -> Response:
    """Retry or cancel a job, then back to the page the form was on (``?ok=<verb>-<id>``);
    an action the job's state does not allow shows the failures page with why (409)."""
    s = _session(request)
    form = await _form(request)
    _check_post(request, s, form)
    store = backend.store()
    try:
        action(store, job_id, actor=f"console:{s.institution}", institution=s.institution)
    except NotFound:
        raise Missing(f"job {job_id}") from None
    except BadRequest as e:
        ctx = _failures_ctx(request, store, s)
        ctx["error"] = str(e)
        return page(request, "failures.html", s, 409, title="Failures", **ctx)
    nxt = _next(_one(form, "next", f"{PREFIX}/failures")).split("?")[0].split("#")[0]
    return RedirectResponse(f"{nxt}?ok={verb}-{job_id}", status_code=303)


# -- rules ------------------------------------------------------------------------------------
@pages.get("/rules", response_class=HTMLResponse)
def rules_page(request: Request, backend: ConsoleBackend, study: str = "") -> HTMLResponse:
    from pipelines.rules import explain
    from workers.processing.routing import current_rules, rules_path

    s = _session(request)
    store = backend.store()
    rs = current_rules(store)
    verdicts, view, error = None, None, ""
    if study.strip():
        view = study_view(store, s, study.strip())
        if not view.series:
            error = "sprim has no routing attributes recorded for this study"
        else:
            verdicts = explain(rs, view.series, view.context)
    if verdicts is not None:
        verdicts = [v for v in verdicts if _applies(rs.get(v.rule), s)]
    return page(request, "rules.html", s, title="Rules", rules=rs, path_=str(rules_path()),
                shown=[r for r in rs.rules if _applies(r, s)], study=study.strip()[:64],
                verdicts=verdicts, view=view, error=error)  # fmt: skip


# -- load -------------------------------------------------------------------------------------
@pages.get("/load", response_class=HTMLResponse)
def load_page(request: Request, backend: ConsoleBackend, refresh: str = "1") -> HTMLResponse:
    s = _session(request)
    return page(request, "load.html", s, title="Load per institution",
                rows=load_by_institution(backend.store(), s), refresh=refresh != "0",
                fragment=f"{PREFIX}/fragments/load")  # fmt: skip


@pages.get("/fragments/load", response_class=HTMLResponse)
def load_fragment(request: Request, backend: ConsoleBackend) -> HTMLResponse:
    s = _session(request)
    return page(request, "_load_table.html", s, rows=load_by_institution(backend.store(), s))


def root() -> Response:
    return RedirectResponse(f"{PREFIX}/jobs", status_code=303)


def mount_console(
    app: FastAPI, store: JobStore | None = None, disp: Dispatcher | None = None
) -> None:
    """Add the console under ``/console`` (and ``/`` -> the jobs page) to the API ``app``;
    ``store``/``disp`` default to the process-wide ones."""
    from workers.core.plugins import load_plugins

    load_plugins()
    ui = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    ui.state.backend = Backend(store, disp)
    ui.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    ui.middleware("http")(_security_headers)
    ui.add_exception_handler(LoginRequired, _login_required)
    ui.add_exception_handler(Missing, _missing)
    ui.add_exception_handler(Refused, _refused)
    for exc_type in UNREACHABLE:
        ui.add_exception_handler(exc_type, _store_down)
    ui.include_router(pages)
    app.mount(PREFIX, ui)
    app.add_api_route("/", root, methods=["GET"], include_in_schema=False)
