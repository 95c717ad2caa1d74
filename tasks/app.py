"""The Celery application: RabbitMQ queues by resource and priority, late acks, task events.

Queues (``SPRIM_QUEUE_PREFIX``, default ``sprim``): ``<p>.cpu`` runs jobs, ``<p>.io`` routes
studies and releases jobs; both are priority queues (``x-max-priority`` 10: urgent 9, normal 5,
low 1) dead-lettering to ``<p>.dead``. Fairness across institutions is done before the broker,
by the job store's release (see :mod:`workers.platform.jobstore`): the broker never holds more than
``SPRIM_DISPATCH_WINDOW`` jobs, so a burst waits in the store, not in RabbitMQ.

``celery -A tasks worker -l info`` consumes both queues; ``celery -A tasks flower`` can watch
(task events are on). ``SPRIM_METRICS_PORT``: Prometheus endpoint (:mod:`tasks.metrics`).
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from pipelines.queues import PRIORITIES, QUEUES, broker_priority
from workers.core.config import settings
from workers.core.phi import quiet_phi_warnings

DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
#: Job priority level -> AMQP priority (pipelines.queues holds the one map).
PRIORITY = {level: broker_priority(level) for level in PRIORITIES.values()}


def queue_name(resource: str) -> str:
    """The broker queue of a step's resource (steps are checked against QUEUES at import)."""
    return f"{settings().queue_prefix}.{resource if resource in QUEUES else 'cpu'}"


def make_app() -> Celery:
    quiet_phi_warnings()  # `celery -A tasks worker` starts here, not through the sprim CLI
    s = settings()
    p = s.queue_prefix
    ex = Exchange(p, type="direct", durable=True)
    args = {"x-max-priority": 10, "x-dead-letter-exchange": f"{p}.dlx"}
    app = Celery(
        "sprim", broker=s.broker_url or DEFAULT_BROKER, include=["tasks.jobs", "tasks.metrics"]
    )
    app.conf.update(
        task_queues=[
            Queue(f"{p}.cpu", ex, routing_key="cpu", durable=True, queue_arguments=args),
            Queue(f"{p}.io", ex, routing_key="io", durable=True, queue_arguments=args),
        ],
        task_default_queue=f"{p}.cpu",
        task_default_exchange=p,
        task_default_routing_key="cpu",
        task_routes={
            "sprim.run_job": {"queue": f"{p}.cpu", "routing_key": "cpu"},
            "sprim.route_study": {"queue": f"{p}.io", "routing_key": "io"},
            "sprim.release": {"queue": f"{p}.io", "routing_key": "io"},
        },
        task_queue_max_priority=10,
        task_default_priority=5,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={"confirm_publish": True},
        worker_hijack_root_logger=False,
        worker_max_tasks_per_child=200,
    )
    if s.worker_recycle_mb:  # checked after each task; KiB (issue 13 item 5)
        app.conf.worker_max_memory_per_child = s.worker_recycle_mb * 1024
    return app


def dead_letter_queue() -> Queue:
    """Where RabbitMQ puts messages rejected without requeue (poison messages): not consumed,
    inspect with ``rabbitmqctl list_queues`` / the management UI. Failed *jobs* are in the job
    store (``sprim jobs list --state failed``)."""
    p = settings().queue_prefix
    return Queue(f"{p}.dead", Exchange(f"{p}.dlx", type="fanout", durable=True), durable=True)


app = make_app()
