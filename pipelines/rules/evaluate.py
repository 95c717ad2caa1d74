"""Pure rule evaluation: which rules a study triggers, on which series; and why not.

Inputs are plain dicts of series-level attributes (DICOM keyword -> value; study-level keywords
are repeated in each series) and a context (``calling_ae``, ``source``, ``institution``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.rules.conditions import Condition, _num
from pipelines.rules.model import Rule, RuleSet, RunStep


@dataclass(frozen=True)
class Match:
    """A rule triggered on one selected series: one job."""

    rule: Rule
    series: Mapping[str, Any]

    @property
    def series_uid(self) -> str:
        return str(self.series.get("SeriesInstanceUID", ""))

    @property
    def study_uid(self) -> str:
        return str(self.series.get("StudyInstanceUID", ""))

    @property
    def steps(self) -> tuple[RunStep, ...]:
        return self.rule.run


def _view(series: Mapping[str, Any], context: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not context:
        return series
    merged = dict(series)
    merged.update({k: v for k, v in context.items() if v is not None})
    return merged


def _all(conds: Sequence[Condition], attrs: Mapping[str, Any]) -> bool:
    for c in conds:
        if not c.test(attrs):
            return False
    return True


def _prefer(rule: Rule, cands: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if not cands or rule.prefer == "all":
        return cands
    if rule.prefer == "first":
        return [cands[0]]

    def n_images(s: Mapping[str, Any]) -> float:
        n = _num(s.get("NumberOfImages", s.get("NumberOfSeriesRelatedInstances")))
        return n if n is not None else -1.0

    if rule.prefer == "thinnest":

        def key(s: Mapping[str, Any]) -> tuple[float, float]:
            t = _num(s.get("SliceThickness"))
            return (t if t is not None else float("inf"), -n_images(s))

        return [min(cands, key=key)]
    return [max(cands, key=n_images)]  # most_images (first wins ties)


def select(rule: Rule, views: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The series ``rule`` runs on among ``views`` (empty when the study does not match)."""
    cands = [
        v
        for v in views
        if _all(rule.match, v)
        and _all(rule.where, v)
        and not (rule.exclude and _all(rule.exclude, v))
    ]
    return _prefer(rule, cands)


def _fast_select(
    rule: Rule, series: Sequence[Mapping[str, Any]], context: Mapping[str, Any]
) -> list[Mapping[str, Any]]:
    """:func:`select` without merging dicts: context conditions once per study."""
    plan = rule.plan
    need_ctx, need_ser = plan.need_context, plan.need_series
    ex_ctx, ex_ser = plan.exclude_context, plan.exclude_series
    for c in need_ctx:
        if not c.test(context):
            return []
    ex_all_ctx = bool(rule.exclude) and all(c.test(context) for c in ex_ctx)
    cands = []
    for s in series:
        for c in need_ser:
            if not c.test(s):
                break
        else:
            if ex_all_ctx and all(c.test(s) for c in ex_ser):
                continue
            cands.append(s)
    return _prefer(rule, cands)


def route(
    ruleset: RuleSet,
    series: Sequence[Mapping[str, Any]],
    context: Mapping[str, Any] | None = None,
    *,
    rules: Sequence[str] | None = None,
) -> list[Match]:
    """Every (rule, selected series) a study triggers, in rule order. Never raises on odd data.

    Parameters
    ----------
    ruleset : RuleSet
    series : sequence of dict
        Series-level attributes of one study.
    context : dict, optional
        ``calling_ae``, ``source`` (archive name), ``institution``.
    rules : sequence of str, optional
        Only evaluate these rule names (a late series re-triggering the rules of one quiet period).
    """
    ctx = {k: v for k, v in (context or {}).items() if v is not None}
    out: list[Match] = []
    for rule in ruleset.rules:
        if rules is not None and rule.name not in rules:
            continue
        for v in _fast_select(rule, series, ctx):
            out.append(Match(rule, _view(v, ctx)))
    return out


@dataclass
class SeriesVerdict:
    """Why one series is or is not run by one rule."""

    series_uid: str
    label: str
    status: str  # picked | candidate | failed_match | failed_where | excluded
    reason: str = ""


@dataclass
class RuleVerdict:
    rule: str
    matched: bool
    picked: list[str] = field(default_factory=list)
    series: list[SeriesVerdict] = field(default_factory=list)


def _label(s: Mapping[str, Any]) -> str:
    bits = [str(s.get(k, "")) for k in ("SeriesNumber", "Modality", "SeriesDescription")]
    return " ".join(b for b in bits if b) or str(s.get("SeriesInstanceUID", "?"))


def explain(
    ruleset: RuleSet,
    series: Sequence[Mapping[str, Any]],
    context: Mapping[str, Any] | None = None,
) -> list[RuleVerdict]:
    """Per rule and per series: picked, a candidate not preferred, or the first failed condition."""
    views = [_view(s, context) for s in series]
    verdicts = []
    for rule in ruleset.rules:
        picked = {id(v) for v in select(rule, views)}
        rv = RuleVerdict(rule.name, bool(picked))
        for v in views:
            uid, label = str(v.get("SeriesInstanceUID", "")), _label(v)
            if id(v) in picked:
                rv.picked.append(uid)
                sv = SeriesVerdict(uid, label, "picked", f"prefer {rule.prefer}")
            elif reason := _first_failure(rule.match, v):
                sv = SeriesVerdict(uid, label, "failed_match", f"match: {reason}")
            elif reason := _first_failure(rule.where, v):
                sv = SeriesVerdict(uid, label, "failed_where", f"select_series.where: {reason}")
            elif rule.exclude and _all(rule.exclude, v):
                what = "; ".join(c.describe() for c in rule.exclude)
                sv = SeriesVerdict(uid, label, "excluded", f"select_series.exclude: {what}")
            else:
                sv = SeriesVerdict(uid, label, "candidate", f"not preferred ({rule.prefer})")
            rv.series.append(sv)
        verdicts.append(rv)
    return verdicts


def _first_failure(conds: Sequence[Condition], attrs: Mapping[str, Any]) -> str | None:
    for c in conds:
        if (why := c.why_not(attrs)) is not None:
            return why
    return None


def format_explain(verdicts: Sequence[RuleVerdict]) -> str:
    """Human-readable text of :func:`explain` (used by ``sprim rules explain``)."""
    lines = []
    for rv in verdicts:
        lines.append(f"rule {rv.rule}: {'MATCHED' if rv.matched else 'no match'}")
        for sv in rv.series:
            lines.append(f"  [{sv.status}] {sv.label} ({sv.series_uid}): {sv.reason}")
    return "\n".join(lines)
