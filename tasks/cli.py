"""Composition root of the ``sprim`` command: the workers CLI plus ``sprim worker``.

With ``SPRIM_BROKER_URL`` set, jobs submitted by any command (``reprocess``, ``serve``,
``watch``, ``listen``, ``jobs retry``) go to RabbitMQ through the Celery dispatcher; unset, they
run in-process (embedded default). ``sprim run`` never needs a broker.
"""

from __future__ import annotations

import typer

from workers.cli import app
from workers.config import settings


def _wire() -> None:
    if settings().broker_url:
        from tasks.dispatch import CeleryDispatcher
        from workers.jobs import set_dispatcher

        set_dispatcher(CeleryDispatcher())


@app.command(
    "worker",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def worker_cmd(
    ctx: typer.Context,
    concurrency: int = typer.Option(2, "--concurrency", "-c", help="Job slots of this worker."),
    loglevel: str = typer.Option("info", "--loglevel", "-l"),
) -> None:
    """A Celery worker on the sprim queues (``celery -A tasks worker`` does the same).

    Extra arguments go to Celery (e.g. ``-Q sprim.cpu``, ``--hostname``, ``-E``).
    """
    from tasks.app import app as celery_app

    celery_app.worker_main(["worker", "-l", loglevel, "-c", str(concurrency), *ctx.args])


def main() -> None:
    _wire()
    app()
