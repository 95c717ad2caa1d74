"""Composition root of the ``sprim`` command: the workers CLI plus ``sprim worker``.

With ``SPRIM_BROKER_URL`` set, jobs submitted by any command (``reprocess``, ``serve``,
``watch``, ``listen``, ``jobs retry``) go to RabbitMQ through the Celery dispatcher; unset, they
run in-process (embedded default). ``sprim run`` never needs a broker.
"""

from __future__ import annotations

import typer

from workers.interfaces.cli import app


def _celery_dispatcher():
    from tasks.celery_dispatcher import CeleryDispatcher

    return CeleryDispatcher()


def _default_dispatcher():
    from workers.core.config import settings

    if settings().broker_url:
        return _celery_dispatcher()
    from workers.platform.inprocess import InProcessDispatcher

    return InProcessDispatcher()


def _wire() -> None:
    """Install the dispatcher every command submits jobs through (this is the composition root).

    Made on the first submission, not here: ``sprim --help`` and ``sprim run`` never import
    Celery, the job store or the settings (start-up time, issue 13).
    """
    from workers.interfaces import cli_ingest
    from workers.platform.dispatcher import set_dispatcher_factory

    set_dispatcher_factory(_default_dispatcher)
    cli_ingest.BROKER_DISPATCHER = _celery_dispatcher  # used only when SPRIM_BROKER_URL is set


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
