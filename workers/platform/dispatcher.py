"""Dispatchers: who runs a job once the store releases it (dependency injection).

The composition root installs one with :func:`set_dispatcher`: ``sprim`` (``tasks.main``) the
Celery one when ``SPRIM_BROKER_URL`` is set, else the in-process one
(:class:`workers.platform.inprocess.InProcessDispatcher`); ``tasks`` installs the Celery one in
workers. ``workers`` never imports Celery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from workers.platform.jobstore import Job

log = logging.getLogger("sprim.jobs")


class Dispatcher(Protocol):
    """Hands work to whatever runs it (a thread here, Celery in ``tasks``)."""

    def send_job(self, job: Job) -> None:
        """Run ``execute_job(job.id)`` somewhere, at ``job.priority``."""

    def send_route(self, study_uid: str, seq: int, rules: list[str], delay_s: float) -> None:
        """Run ``route_due(study_uid, seq, rules)`` after ``delay_s`` seconds."""

    def send_retry(self, job: Job | None, delay_s: float) -> None:
        """Release waiting jobs again after ``delay_s`` (a job's retry time comes)."""


_installed: Dispatcher | None = None
_factory: Callable[[], Dispatcher] | None = None


def set_dispatcher(d: Dispatcher) -> None:
    """Install the process-wide dispatcher (done once by the composition root)."""
    global _installed
    _installed = d


def set_dispatcher_factory(make: Callable[[], Dispatcher]) -> None:
    """Install a dispatcher made on first use: commands that submit nothing never import
    what it needs (the Celery dispatcher imports Celery)."""
    global _factory
    _factory = make


def installed() -> Dispatcher | None:
    """The installed dispatcher, or None before the composition root installed one."""
    return _installed


def dispatcher() -> Dispatcher:
    if _installed is None and _factory is not None:
        set_dispatcher(_factory())
    if _installed is None:
        raise RuntimeError(
            "no job dispatcher installed: the program's entry point must call set_dispatcher()"
        )
    return _installed


def release_later(disp: Dispatcher | None, delay: float) -> None:
    """Ask for a release in ``delay`` seconds (a retry time comes); never raises."""
    try:
        (disp or dispatcher()).send_retry(None, delay)
    except Exception:  # noqa: BLE001  (the periodic release catches up)
        log.warning("event=release_later_failed delay=%.1f", delay)
