"""Routing rules: declarative YAML, validated at load, evaluated purely, explainable (docs/rules.md)."""

from pipelines.queues import PRIORITIES
from pipelines.rules.attributes import (
    DERIVED_KEYWORDS,
    IMAGE_KEYWORDS,
    MIN_VOLUME_IMAGES,
    ROUTING_KEYWORDS,
    stack_attributes,
)
from pipelines.rules.conditions import OPERATORS, Condition, compile_condition
from pipelines.rules.evaluate import (
    Match,
    RuleVerdict,
    SeriesVerdict,
    explain,
    format_explain,
    route,
    select,
)
from pipelines.rules.loader import load_rules, parse_duration
from pipelines.rules.model import Rule, RulesError, RuleSet, RunStep

__all__ = [
    "DERIVED_KEYWORDS",
    "IMAGE_KEYWORDS",
    "MIN_VOLUME_IMAGES",
    "ROUTING_KEYWORDS",
    "stack_attributes",
    "OPERATORS",
    "PRIORITIES",
    "Condition",
    "Match",
    "Rule",
    "RuleSet",
    "RuleVerdict",
    "RulesError",
    "RunStep",
    "SeriesVerdict",
    "compile_condition",
    "explain",
    "format_explain",
    "load_rules",
    "parse_duration",
    "route",
    "select",
]
