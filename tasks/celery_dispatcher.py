"""The Celery dispatcher: what ``workers`` hands jobs to when a broker is configured."""

from __future__ import annotations

import uuid

from tasks.app import PRIORITY, app, queue_name
from workers.core.config import settings
from workers.platform.jobstore import Job


def _limits(job: Job) -> tuple[float, float]:
    s = settings()
    soft = s.step_time_limit_s * max(1, len(job.steps)) + s.io_time_limit_s
    return soft, soft * 1.1 + 30


def _resource(job: Job) -> str:
    from pipelines import get_step

    kinds = set()
    for st in job.steps:
        try:
            kinds.add(get_step(st["use"]).resource)
        except KeyError:
            kinds.add("cpu")
    return kinds.pop() if len(kinds) == 1 else "cpu"


class CeleryDispatcher:
    """Implements :class:`workers.platform.dispatcher.Dispatcher` with Celery tasks over RabbitMQ."""

    def send_job(self, job: Job, countdown: float | None = None) -> None:
        soft, hard = _limits(job)
        app.send_task(  # by name: the task module (tasks.jobs) installs this dispatcher
            "sprim.run_job",
            args=[job.id],
            queue=queue_name(_resource(job)),
            priority=PRIORITY.get(job.priority, 5),
            soft_time_limit=soft,
            time_limit=hard,
            countdown=countdown,
            task_id=f"job-{job.id}-{uuid.uuid4().hex[:8]}",
        )

    def send_retry(self, job: Job | None, delay_s: float) -> None:
        """Release waiting jobs after ``delay_s`` (a retry time comes; workers' periodic
        release catches up too)."""
        app.send_task("sprim.release", countdown=delay_s or None)

    def send_route(self, study_uid: str, seq: int, rules: list[str], delay_s: float) -> None:
        app.send_task("sprim.route_study", args=[study_uid, seq, rules], countdown=delay_s or None)
