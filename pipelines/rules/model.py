"""Routing rule models (immutable) and the rules error that points at a file and line."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydantic import BaseModel

from pipelines.queues import PRIORITIES
from pipelines.registry import Step
from pipelines.rules.conditions import Condition

PREFER = ("thinnest", "most_images", "first", "all")
TRIGGERS = ("study_stable", "series_stable")
CONTEXT_KEYS = ("calling_ae", "source", "institution")


class RulesError(Exception):
    """A rules file is refused: ``file:line: what is wrong``."""

    def __init__(self, message: str, file: str = "<rules>", line: int = 0) -> None:
        self.file, self.line, self.message = file, line, message
        super().__init__(f"{file}:{line}: {message}")


@dataclass(frozen=True)
class RunStep:
    """One step of a rule with its validated params."""

    use: str
    step: Step
    params: BaseModel
    raw: dict[str, Any] = field(default_factory=dict)
    line: int = 0


@dataclass(frozen=True)
class Rule:
    """One routing rule (see docs/rules.md)."""

    name: str
    match: tuple[Condition, ...]
    where: tuple[Condition, ...]
    exclude: tuple[Condition, ...]
    prefer: str
    run: tuple[RunStep, ...]
    priority: str = "normal"
    trigger_on: str = "study_stable"
    quiet_period_s: float = 0.0
    destination: str | None = None
    description: str = ""
    line: int = 0

    @property
    def priority_level(self) -> int:
        return PRIORITIES[self.priority]

    @cached_property
    def plan(self) -> SelectionPlan:
        """The rule's conditions split once: study context (tested once per study) vs series."""

        def split(conds: tuple[Condition, ...]) -> tuple[Conditions, Conditions]:
            ctx = tuple(c for c in conds if c.key in CONTEXT_KEYS)
            return ctx, tuple(c for c in conds if c.key not in CONTEXT_KEYS)

        m_ctx, m_ser = split(self.match)
        w_ctx, w_ser = split(self.where)
        return SelectionPlan(m_ctx + w_ctx, m_ser + w_ser, *split(self.exclude))


Conditions = tuple[Condition, ...]


@dataclass(frozen=True)
class SelectionPlan:
    """What a series must meet (context conditions, series conditions) and what excludes it."""

    need_context: Conditions
    need_series: Conditions
    exclude_context: Conditions
    exclude_series: Conditions


@dataclass(frozen=True)
class RuleSet:
    """A validated set of rules; ``digest`` identifies the text it was loaded from."""

    rules: tuple[Rule, ...]
    source: str = "<rules>"
    digest: str = ""

    def get(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(f"no rule {name!r} in {self.source}")

    def __len__(self) -> int:
        return len(self.rules)
