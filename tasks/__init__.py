"""Thin Celery glue: the app, its configuration, and tasks that call into ``workers``.

``celery -A tasks worker -l info`` finds :data:`app` here.
"""

from tasks.app import app

__all__ = ["app"]
