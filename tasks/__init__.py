"""Thin Celery glue: the app, its configuration, and tasks that call into ``workers``.

``celery -A tasks worker -l info`` finds :data:`app` here. It is imported on first access, so
``sprim --help`` and ``sprim run`` (``tasks.main``) never import Celery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    app: Celery

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    # "celery" too: Celery's app finder tries it when ``tasks.app`` is already the submodule
    # (something imported ``tasks.app`` before the first access)
    if name in ("app", "celery"):
        from tasks.app import app as celery_app

        # the import bound the submodule to ``tasks.app``: the Celery app replaces it, as before
        globals()["app"] = celery_app
        return celery_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
