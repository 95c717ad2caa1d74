"""The ``sprim`` command line. Sub-command groups live in their own modules and are added here."""

from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup


class _Sprim(TyperGroup):
    """Every command: a job store that cannot answer is one line and exit 3, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:
            # Only a command that opened the job store can fail on it: `sprim run` and
            # `sprim --help` never import it (SQLAlchemy, ~0.3 s of start-up, issue 13).
            jobstore = sys.modules.get("workers.platform.jobstore")
            if jobstore is None or not isinstance(e, jobstore.UNREACHABLE):
                raise
            Console(stderr=True).print(
                f"[red]error:[/] {jobstore.unreachable(e)}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(3) from None


app = typer.Typer(
    name="sprim",
    cls=_Sprim,
    help="Shared post-processing for medical imaging: DICOM in, derived DICOM out.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """Shared post-processing for medical imaging: DICOM in, derived DICOM out."""
    from workers.core.phi import quiet_phi_warnings
    from workers.core.plugins import PluginError, load_plugins

    quiet_phi_warnings()  # before any writer runs: some library warnings print patient names
    try:
        load_plugins()  # SPRIM_PLUGINS site step modules, before any command lists or runs steps
    except PluginError as e:
        Console(stderr=True).print(Text.assemble(("error: ", "red"), str(e)), soft_wrap=True)
        raise typer.Exit(2) from None


def type_text(annotation: object) -> str:
    """A param's type as `sprim steps` shows it: ``float``, ``one of: AVG, MIP``,
    ``list of: axial, coronal, sagittal``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in args)
    if origin in (list, tuple, set, frozenset) and args:
        inner = type_text(args[0])
        return f"{origin.__name__} of: {inner.removeprefix('one of: ')}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


@app.command("steps")
def steps_cmd() -> None:
    """List the registered steps with their params, defaults, ranges and units."""
    from pipelines import all_steps
    from pipelines.registry import param_range

    # Text, not markup: docstrings and descriptions hold brackets ("[lower_hu, upper_hu]").
    for s in all_steps():
        title = Text(f"{s.name} {s.version} — {s.summary}")
        table = Table(title=title, title_justify="left")
        table.add_column("param")
        table.add_column("type")
        table.add_column("default")
        table.add_column("range")
        table.add_column("description")
        for name, f in s.params.model_fields.items():
            table.add_row(
                Text(name),
                Text(type_text(f.annotation)),
                Text(repr(f.default)),
                Text(param_range(f)),
                Text(f.description or ""),
            )
        console.print(table)


def main() -> None:
    app()


from workers.interfaces.cli_ingest import register as _register_ingest  # noqa: E402  (issue 5: watch, listen)

_register_ingest(app)


@app.command("run")
def run_cmd(
    inputs: list[Path] = typer.Argument(..., help="DICOM folders, files or .zip archives."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for derived DICOM, previews, summary.json, report.html."
    ),
    rules: Path | None = typer.Option(
        None, "--rules", help="Routing rules YAML (default: built-in)."
    ),
    step: list[str] = typer.Option(
        [], "--step", help="Run this step on every volume series instead of rules (repeatable)."
    ),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Step param key=value (YAML value), repeatable; NAME.key=value targets one step.",
    ),
) -> None:
    """Process DICOM series on embedded defaults: no broker, no archive."""
    from workers.processing import offline as runmod

    try:
        if step:
            calls = runmod.parse_sets(step, set_)
            plan = runmod.plan_steps(calls)
        else:
            if set_:
                raise runmod.UsageError("--set needs --step (rules carry their own params)")
            plan = runmod.plan_rules(rules)
    except (runmod.UsageError, runmod.RulesError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    for p in inputs:
        if not p.exists():
            console.print(f"[red]error:[/] input {p} does not exist")
            raise typer.Exit(2)
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("scanning", total=None)
        summary = runmod.run(
            inputs,
            out,
            plan_fn=plan,
            progress=lambda msg: bar.update(task, description=escape(shown(msg))),
        )
    _print_summary(summary)
    if summary.failed or summary.error:
        raise typer.Exit(1)


#: Control and format characters (ESC, BEL, bidi overrides...) never reach the terminal.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


def shown(text: object, limit: int = 300) -> str:
    """A string from DICOM (or a message holding one) safe to print: no control characters.

    Rich markup is not escaped here: print it as ``Text`` or through ``escape``.
    """
    s = _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], str(text))
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _cell(text: object) -> Text:
    return Text(shown(text))


_STATE_SHOWN = {
    "done": "[green]done[/]",
    "partial": "[yellow]partial[/]",
    "failed": "[red]failed[/]",
}


def _failure(f: dict) -> str:
    return (
        f"{f['step']} ({f['output']}): {f['reason']}"
        if f["output"]
        else f"{f['step']}: {f['reason']}"
    )


_SKIPPED_SHOWN = 20


def _print_summary(summary) -> None:
    table = Table(title=f"sprim run — {summary.series_found} series found, {summary.seconds:.1f} s")
    for col in ("series", "rule", "state", "outputs", "seconds", "detail"):
        table.add_column(col)
    for j in summary.jobs:
        outs = sorted(
            {(o["series_number"], o["series_description"]) for s in j.steps for o in s["outputs"]}
        )
        table.add_row(
            _cell(f"{j.modality} {j.series_description}"),
            _cell(j.rule),
            _STATE_SHOWN.get(j.state, escape(j.state)),
            Text("\n".join(shown(f"{n} {d}") for n, d in outs)),
            f"{j.seconds:.2f}",
            Text(
                "\n".join(shown(f"failed: {_failure(f)}", 1000) for f in j.failures)
                or shown(j.error or "; ".join(j.notes), 1000)
            ),
        )
    for u in summary.unmatched:
        table.add_row(
            _cell(u.get("series", "")), "—", "not selected", "", "", _cell(u.get("reason", ""))
        )
    if summary.jobs or summary.unmatched:
        console.print(table)
    if summary.skipped:
        console.print(f"skipped {len(summary.skipped)} file(s):")
        for sk in summary.skipped[:_SKIPPED_SHOWN]:
            console.print(Text(f"  {shown(sk['path'])}: {shown(sk['reason'])}"))
        if len(summary.skipped) > _SKIPPED_SHOWN:
            console.print(f"  ... and {len(summary.skipped) - _SKIPPED_SHOWN} more (summary.json)")
    if summary.error:
        console.print(Text.assemble(("error: ", "red"), shown(summary.error, 1000)))
    console.print(
        Text.assemble(
            "results in ", (shown(summary.out_dir), "bold"), " (summary.json, report.html)"
        )
    )


from workers.interfaces.cli_jobs import register as _register_platform  # noqa: E402

_register_platform(app)


@app.command("config")
def config_cmd() -> None:
    """Print every SPRIM_* setting: the value in effect and what it means."""
    from workers.core.config import Settings, settings

    current = settings()
    table = Table(title="sprim configuration (environment SPRIM_*)", title_justify="left")
    for col in ("variable", "value", "meaning"):
        table.add_column(col)
    for name, f in Settings.model_fields.items():
        value = getattr(current, name)
        if name == "api_tokens" and value:
            value = "<set: tokens hidden>"
        elif name == "console_secret" and value:
            value = "<set: hidden>"
        elif "://" in str(value):  # URLs, and the archives' specs: no passwords on screens
            value = re.sub(r"(//[^:/@]+):[^@/]+@", r"\1:***@", str(value))
        table.add_row(f"SPRIM_{name.upper()}", str(value), f.description or "")
    console.print(table)
    _archive_access_table(current)


def _archive_access_table(current) -> None:
    """Credentials and TLS per archive: what is set, secrets as <set>, problems named."""
    from workers.core.config import ConfigError, archive_access, archive_variables

    table = Table(
        title="archive credentials and TLS (SPRIM_ARCHIVE[_<NAME>]_<FIELD>; secrets never shown)",
        title_justify="left",
    )
    for col in ("archive", "variable", "value"):
        table.add_column(col)
    names: list[str | None] = [None, *current.archives]
    for name in names:
        label = name or "SPRIM_ARCHIVE_URL"
        try:
            shown = archive_access(name).summary()
        except ConfigError as e:
            table.add_row(label, "-", f"error: {e}")
            continue
        prefix = archive_variables(name)
        for field, value in shown.items():
            table.add_row(label, f"{prefix}{field.upper()}", value)
        if not shown:
            table.add_row(label, "-", "no credentials, system CAs")
    console.print(table)
