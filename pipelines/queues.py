"""Queue and priority names shared by steps, rules and the Celery app (pure: names and numbers).

A step's ``resource`` names the queue its jobs run on; a rule's ``priority`` names a level that
the job store orders by and that becomes the broker's message priority.
"""

from __future__ import annotations

#: Broker queues (``<SPRIM_QUEUE_PREFIX>.<name>``): ``cpu`` runs jobs, ``io`` routes studies and
#: releases jobs. A step may name either as its ``resource``.
QUEUES = ("cpu", "io")

#: Rule priority name -> job priority level (higher runs first).
PRIORITIES = {"urgent": 2, "normal": 1, "low": 0}


def broker_priority(level: int) -> int:
    """AMQP message priority of a job priority level: urgent 9, normal 5, low 1 (of 0-9)."""
    return 1 + 4 * max(0, min(level, max(PRIORITIES.values())))
