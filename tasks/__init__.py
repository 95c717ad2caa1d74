"""Thin Celery glue: the app, its configuration, and tasks that call into ``workers``."""
