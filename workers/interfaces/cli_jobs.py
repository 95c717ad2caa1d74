"""``sprim rules …``, ``sprim jobs …``, ``sprim reprocess``, ``sprim serve`` (issue 4)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()
rules_app = typer.Typer(help="Check, explain and simulate routing rules.", no_args_is_help=True)
jobs_app = typer.Typer(help="List, show, cancel and retry jobs.", no_args_is_help=True)


def _load(file: Path):
    from pipelines.rules import RulesError
    from workers.processing.routing import load_rules_file

    try:
        return load_rules_file(file)
    except RulesError as e:
        console.print(f"[red]refused:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@rules_app.command("check")
def rules_check(file: Path = typer.Argument(..., help="Rules YAML.")) -> None:
    """Validate a rules file against the step registry; exit 2 with file:line if it is wrong."""
    rs = _load(file)
    for r in rs.rules:
        steps = ", ".join(s.use for s in r.run)
        console.print(f"{r.name}: priority {r.priority}, quiet {r.quiet_period_s:g}s, run {steps}")
    console.print(f"[green]ok[/] {file}: {len(rs)} rules (digest {rs.digest})")


@rules_app.command("explain")
def rules_explain(
    file: Path = typer.Argument(..., help="Rules YAML."),
    input: Path = typer.Argument(..., help="A DICOM folder, file or .zip."),
    calling_ae: str = typer.Option("", help="Context: the sending AE title."),
    source: str = typer.Option("", help="Context: the source archive name."),
    institution: str = typer.Option("", help="Context: the institution."),
) -> None:
    """Per series: which rules matched, the failed condition of each that did not, the pick."""
    from pipelines.rules import explain, format_explain
    from workers.reading.series import scan

    rs = _load(file)
    series = [s.attributes for s in scan(input)]
    if not series:
        console.print(f"[red]no DICOM series in {input}[/]")
        raise typer.Exit(1)
    ctx = {
        k: v
        for k, v in (("calling_ae", calling_ae), ("source", source), ("institution", institution))
        if v
    }
    by_study: dict[str, list[dict]] = {}
    for s in series:
        by_study.setdefault(str(s.get("StudyInstanceUID", "")), []).append(s)
    for study, ss in by_study.items():
        console.print(f"[bold]study {study}[/] ({len(ss)} series)", highlight=False)
        console.print(
            format_explain(explain(rs, ss, ctx)), highlight=False, markup=False, soft_wrap=True
        )


@rules_app.command("simulate")
def rules_simulate(file: Path = typer.Argument(..., help="Rules YAML (new or changed).")) -> None:
    """Over the studies known to the job store: what these rules would trigger (nothing runs)."""
    from pipelines.rules import route
    from workers.platform.jobstore import open_store

    rs = _load(file)
    store = open_store()
    table = Table(title=f"simulate {file} over known studies")
    for c in ("study", "institution", "rule", "series", "priority", "now"):
        table.add_column(c)
    n_jobs = n_none = 0
    studies = store.studies()
    for st in studies:
        ms = route(rs, st.series or [], st.context or {})
        if not ms:
            n_none += 1
            table.add_row(st.study_uid, st.institution, "—", "no rule matches", "", "")
        for m in ms:
            n_jobs += 1
            ran = [
                j
                for j in store.list(study_uid=st.study_uid)
                if j.rule == m.rule.name and j.series_uid == m.series_uid
            ]
            now = "new" if not ran else f"ran ({ran[0].state})"
            desc = f"{m.series.get('SeriesNumber', '')} {m.series.get('SeriesDescription', '')}".strip()
            table.add_row(st.study_uid, st.institution, m.rule.name, desc, m.rule.priority, now)
    console.print(table)
    console.print(
        f"{len(studies)} studies: {n_jobs} jobs would be triggered, {n_none} studies match no rule"
    )


#: Job ids are 32-bit in the store: anything else is a usage error, not a lookup.
_JOB_ID = typer.Argument(..., min=1, max=2**31 - 1, help="Job id.")


def _fmt_t(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


@jobs_app.command("list")
def jobs_list(
    state: str | None = typer.Option(
        None, "--state", help="queued|running|done|failed|cancelled|no_match"
    ),
    institution: str | None = typer.Option(None, help="Only this institution."),
    study: str | None = typer.Option(None, help="Only this StudyInstanceUID."),
    limit: int = typer.Option(50, help="At most this many (newest first)."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines."),
) -> None:
    """Jobs, newest first; ``--state failed`` is the admin's dead-letter view."""
    from workers.platform.jobstore import open_store

    jobs = open_store().list(state=state, institution=institution, study_uid=study, limit=limit)
    if as_json:
        for j in jobs:
            print(json.dumps(j.as_dict(), default=str))
        return
    table = Table()
    for c in (
        "id",
        "state",
        "rule/requester",
        "institution",
        "study",
        "attempts",
        "updated",
        "error",
    ):
        table.add_column(c)
    for j in jobs:
        who = j.rule or "" if not j.requester else f"{j.rule} ({j.requester})"
        table.add_row(str(j.id), j.state, who, j.institution, j.study_uid, str(j.attempts),
                      _fmt_t(j.updated_at), (j.error or j.context.get("why", ""))[:120])  # fmt: skip
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: int = _JOB_ID) -> None:
    """Everything about one job, with its audit trail."""
    from workers.platform.jobstore import open_store

    store = open_store()
    job = store.get(job_id)
    if job is None:
        console.print(f"[red]no job {job_id}[/]")
        raise typer.Exit(1)
    print(json.dumps(job.as_dict(), indent=2, default=str))
    for a in store.audit_trail(job_id=job_id):
        print(
            f"{_fmt_t(a.at)} {a.event} {a.from_state or ''}->{a.to_state or ''} {a.actor} {a.detail}"
        )


def _act(fn, job_id: int) -> None:
    from workers.platform.jobstore import open_store
    from workers.platform.reprocess import BadRequest, NotFound

    try:
        job = fn(open_store(), job_id, actor="cli")
    except (NotFound, BadRequest) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    console.print(f"job {job.id}: {job.state}")


@jobs_app.command("cancel")
def jobs_cancel(job_id: int = _JOB_ID) -> None:
    """Cancel a queued or running job (a running one finishes its step, its result is dropped)."""
    from workers.platform.reprocess import cancel

    _act(cancel, job_id)


@jobs_app.command("retry")
def jobs_retry(job_id: int = _JOB_ID) -> None:
    """Queue a failed or cancelled job again (attempts reset)."""
    from workers.platform.reprocess import retry

    _act(retry, job_id)


def reprocess_cmd(
    study_uid: str = typer.Argument(..., help="StudyInstanceUID."),
    step: list[str] = typer.Option(..., "--step", help="Step to run (repeatable)."),
    set_: list[str] = typer.Option(
        [], "--set", help="key=value (YAML value); STEP.key=value for one step."
    ),
    series: str | None = typer.Option(
        None, help="SeriesInstanceUID (default: the one processed before)."
    ),
    requester: str = typer.Option("cli", help="Who asks (audit trail)."),
    wait: bool = typer.Option(False, help="Wait until the job is final."),
) -> None:
    """Run steps again on a study: same params replace earlier outputs, others add a new series."""
    from workers.platform.jobstore import open_store
    from workers.platform.reprocess import BadRequest, NotFound, parse_sets, reprocess

    try:
        sets = parse_sets(set_)
        steps = []
        for name in step:
            w = {k.split(".", 1)[1] if "." in k and k.rsplit(".", 1)[0] == name else k: v
                 for k, v in sets.items() if "." not in k or k.rsplit(".", 1)[0] == name}  # fmt: skip
            steps.append({"use": name, "with": w})
        from workers.platform.jobstore import FINAL

        store = open_store()
        job = reprocess(store, study_uid, steps, requester=requester, series_uid=series)
    except (NotFound, BadRequest) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(1) from None
    console.print(f"job {job.id} queued ({', '.join(s['use'] for s in job.steps)})")
    while wait:
        j = store.get(job.id)
        if j and j.state in FINAL:
            console.print(f"job {j.id}: {j.state} {j.error or ''}")
            raise typer.Exit(0 if j.state == "done" else 1)
        time.sleep(0.5)


def serve_cmd(
    host: str = typer.Option("127.0.0.1", help="Bind address."),
    port: int = typer.Option(8000, help="Port."),
) -> None:
    """The REST API (reprocessing, jobs; OpenAPI docs at /docs) and the web console at /."""
    import uvicorn

    from workers.core.config import settings
    from workers.interfaces.api import create_app
    from workers.platform.dispatcher import set_dispatcher
    from workers.platform.inprocess import InProcessDispatcher
    from workers.platform.jobstore import open_store

    open_store()  # an unreachable job store stops the start-up in one line (workers.interfaces.cli)
    if not settings().broker_url:  # embedded: jobs run in a background thread, not in requests
        set_dispatcher(InProcessDispatcher(background=True))

    uvicorn.run(create_app(), host=host, port=port, log_level="info")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``sprim`` app."""
    app.add_typer(rules_app, name="rules")
    app.add_typer(jobs_app, name="jobs")
    app.command("reprocess")(reprocess_cmd)
    app.command("serve")(serve_cmd)
