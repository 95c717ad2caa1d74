"""The ``sprim`` command line. Sub-command groups live in their own modules and are added here."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from pipelines import all_steps

app = typer.Typer(
    name="sprim",
    help="Shared post-processing for medical imaging: DICOM in, derived DICOM out.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """Shared post-processing for medical imaging: DICOM in, derived DICOM out."""


@app.command("steps")
def steps_cmd() -> None:
    """List the registered steps with their params, defaults and units."""
    for s in all_steps():
        table = Table(title=f"{s.name} {s.version} — {s.summary}", title_justify="left")
        table.add_column("param")
        table.add_column("type")
        table.add_column("default")
        table.add_column("description")
        for name, f in s.params.model_fields.items():
            ann = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
            table.add_row(name, ann, repr(f.default), f.description or "")
        console.print(table)


def main() -> None:
    app()
