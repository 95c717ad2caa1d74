"""Load and validate a rules YAML text into a :class:`RuleSet`, with ``file:line`` errors.

Validation is complete at load: every ``use`` names a registered step, every ``with`` validates
against that step's params model (the error points at the offending key's line), every condition
uses the closed operator set on a routing attribute (:data:`ROUTING_KEYWORDS`, the same from
every archive) or on ``calling_ae`` / ``source`` / ``institution``.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipelines.catalog import get_step
from pipelines.queues import PRIORITIES
from pipelines.rules.attributes import ROUTING_KEYWORDS
from pipelines.rules.conditions import Condition, compile_condition
from pipelines.rules.model import (
    CONTEXT_KEYS,
    PREFER,
    TRIGGERS,
    Rule,
    RulesError,
    RuleSet,
    RunStep,
)

_RULE_KEYS = {
    "name", "description", "enabled", "trigger", "match", "select_series", "run", "priority",
    "destination",
}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers the line of itself and of each key (1-based)."""

    line: int = 0
    key_lines: dict[Any, int]


class _Seq(list[Any]):
    line: int = 0
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    pass


# YAML 1.2 booleans only: in YAML 1.1 `on:`/`yes`/`no` are booleans, so `trigger: {on: ...}` and
# `Laterality: {eq: N}`-style values would silently change meaning.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    m = _Map()
    m.line, m.key_lines = node.start_mark.line + 1, {}
    for k_node, v_node in node.value:
        k = loader.construct_object(k_node, deep=True)
        if k in m:
            raise RulesError(f"duplicate key {k!r}", line=k_node.start_mark.line + 1)
        m[k] = loader.construct_object(v_node, deep=True)
        m.key_lines[k] = k_node.start_mark.line + 1
    return m


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    s = _Seq(loader.construct_object(n, deep=True) for n in node.value)
    s.line, s.item_lines = node.start_mark.line + 1, [n.start_mark.line + 1 for n in node.value]
    return s


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def _line(obj: Any, key: Any = None, default: int = 0) -> int:
    if isinstance(obj, _Map):
        return obj.key_lines.get(key, obj.line) if key is not None else obj.line
    if isinstance(obj, _Seq):
        if isinstance(key, int) and 0 <= key < len(obj.item_lines):
            return obj.item_lines[key]
        return obj.line
    return default


def parse_duration(v: Any) -> float:
    """``30s``, ``2m``, ``500ms``, ``1h`` or a number of seconds -> seconds."""
    if isinstance(v, bool):
        raise ValueError(f"bad duration {v!r}")
    if isinstance(v, int | float):
        if v < 0:
            raise ValueError(f"negative duration {v!r}")
        return float(v)
    m = _DURATION.match(str(v))
    if not m:
        raise ValueError(f"bad duration {v!r}; use e.g. 30s, 2m, 500ms")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


class _Ctx:
    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, msg: str, line: int) -> RulesError:
        return RulesError(msg, self.file, line)

    def one_of(self, value: Any, known: Collection[str], what: str, line: int) -> None:
        """Refuse ``value`` unless it is one of ``known``: ``what 'x'; known: a, b``."""
        if value not in known:
            raise self.fail(f"{what} {value!r}; known: {', '.join(known)}", line)

    def conditions(self, spec: Any, where: str, line: int) -> tuple[Condition, ...]:
        if spec is None:
            return ()
        if not isinstance(spec, dict):
            raise self.fail(f"{where} must be a mapping of attribute: condition", line)
        out = []
        for key, cond in spec.items():
            kline = _line(spec, key, line)
            if not isinstance(key, str):
                raise self.fail(f"{where}: attribute name must be text, got {key!r}", kline)
            if key not in CONTEXT_KEYS and key not in ROUTING_KEYWORDS:
                known = (*ROUTING_KEYWORDS, *CONTEXT_KEYS)
                near = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise self.fail(
                    f"{where}: {key!r} is not a routing attribute{hint}; rules may test: "
                    f"{', '.join(known)}",
                    kline,
                )
            try:
                out.append(compile_condition(key, cond, kline))
            except ValueError as e:
                raise self.fail(f"{where}: {e}", kline) from None
        return tuple(out)

    def run_step(self, item: Any, rname: str, line: int) -> RunStep:
        if isinstance(item, str):
            item = {"use": item}
        if not isinstance(item, dict) or "use" not in item:
            raise self.fail(f"rule {rname}: each run item needs 'use: <step>'", line)
        if extra := set(item) - {"use", "with"}:
            k = sorted(extra, key=str)[0]
            raise self.fail(
                f"rule {rname}: unknown key {k!r} in run item (use, with)", _line(item, k, line)
            )
        use, raw = item["use"], item.get("with") or {}
        uline = _line(item, "use", line)
        try:
            st = get_step(str(use))
        except KeyError as e:
            raise self.fail(f"rule {rname}: {e.args[0]}", uline) from None
        wline = _line(item, "with", uline)
        if not isinstance(raw, dict):
            raise self.fail(f"rule {rname}: 'with' of {use} must be a mapping of params", wline)
        try:
            params = st.validate(dict(raw))
        except ValidationError as e:
            # Every refused param, each with its own line when it differs from the first's.
            parts, eline = [], wline
            for k, err in enumerate(e.errors()):
                loc = err.get("loc") or ()
                line_k = _line(raw, loc[0], wline) if loc else wline
                eline = line_k if k == 0 else eline
                at = f" (line {line_k})" if k and line_k != eline else ""
                parts.append(f"param {'.'.join(map(str, loc)) or 'with'}{at}: {err['msg']}")
            raise self.fail(f"rule {rname}: step {use} {'; '.join(parts)}", eline) from None
        return RunStep(str(use), st, params, _plain(raw), uline)

    def rule(self, r: Any, line: int, seen: set[str]) -> Rule | None:
        if not isinstance(r, dict):
            raise self.fail("each rule must be a mapping (name, match, run, ...)", line)
        if extra := set(r) - _RULE_KEYS:
            k = sorted(extra, key=str)[0]
            raise self.fail(
                f"unknown rule key {k!r}; known: {', '.join(sorted(_RULE_KEYS))}", _line(r, k, line)
            )
        name = self.rule_name(r, line, seen)
        on, quiet = self.trigger(r, name, line)
        sel = r.get("select_series") or {}
        sline = _line(r, "select_series", line)
        prefer = self.prefer(sel, name, sline)
        prio = r.get("priority", "normal")
        self.one_of(prio, PRIORITIES, f"rule {name}: priority", _line(r, "priority", line))
        steps = self.run_steps(r, name, line)
        dest = r.get("destination")
        if dest is not None and not isinstance(dest, str):
            raise self.fail(
                f"rule {name}: destination must be an archive name", _line(r, "destination", line)
            )
        rule = Rule(
            name=name,
            match=self.conditions(r.get("match"), f"rule {name}: match", _line(r, "match", line)),
            where=self.conditions(
                sel.get("where"), f"rule {name}: where", _line(sel, "where", sline)
            ),
            exclude=self.conditions(
                sel.get("exclude"), f"rule {name}: exclude", _line(sel, "exclude", sline)
            ),
            prefer=prefer,
            run=steps,
            priority=prio,
            trigger_on=on,
            quiet_period_s=quiet,
            destination=dest,
            description=str(r.get("description", "")),
            line=line,
        )
        enabled = r.get("enabled", True)
        if not isinstance(enabled, bool):
            raise self.fail(
                f"rule {name}: enabled must be true or false", _line(r, "enabled", line)
            )
        return rule if enabled else None

    def rule_name(self, r: dict[Any, Any], line: int, seen: set[str]) -> str:
        """The rule's name, refused unless well-formed and new in this file."""
        name = r.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise self.fail(
                f"rule needs a name of letters, digits, _.-; got {name!r}", _line(r, "name", line)
            )
        if name in seen:
            raise self.fail(f"duplicate rule name {name!r}", _line(r, "name", line))
        seen.add(name)
        return name

    def trigger(self, r: dict[Any, Any], name: str, line: int) -> tuple[str, float]:
        """``trigger: {on, quiet_period}`` -> (event, quiet period in seconds)."""
        trig = r.get("trigger") or {}
        tline = _line(r, "trigger", line)
        if not isinstance(trig, dict) or set(trig) - {"on", "quiet_period"}:
            raise self.fail(f"rule {name}: trigger takes 'on' and 'quiet_period'", tline)
        on = trig.get("on", "study_stable")
        self.one_of(on, TRIGGERS, f"rule {name}: trigger on", _line(trig, "on", tline))
        try:
            quiet = parse_duration(trig.get("quiet_period", 0))
        except ValueError as e:
            raise self.fail(
                f"rule {name}: quiet_period: {e}", _line(trig, "quiet_period", tline)
            ) from None
        return on, quiet

    def prefer(self, sel: Any, name: str, sline: int) -> str:
        """``select_series`` keys checked; its ``prefer`` (the conditions are compiled later)."""
        if not isinstance(sel, dict) or set(sel) - {"where", "exclude", "prefer"}:
            raise self.fail(f"rule {name}: select_series takes where, exclude, prefer", sline)
        prefer: str = sel.get("prefer", "first")
        self.one_of(prefer, PREFER, f"rule {name}: prefer", _line(sel, "prefer", sline))
        return prefer

    def run_steps(self, r: dict[Any, Any], name: str, line: int) -> tuple[RunStep, ...]:
        run = r.get("run")
        rline = _line(r, "run", line)
        if not isinstance(run, list) or not run:
            raise self.fail(f"rule {name}: 'run' must be a non-empty list of steps", rline)
        return tuple(self.run_step(it, name, _line(run, i, rline)) for i, it in enumerate(run))


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def load_rules(source: str | Path, *, name: str | None = None) -> RuleSet:
    """Parse and validate rules from a path or a YAML text.

    Parameters
    ----------
    source : str or Path
        A ``Path`` (or a string naming an existing ``.yaml``/``.yml`` file) or YAML text.
    name : str, optional
        File name used in errors when ``source`` is text.

    Raises
    ------
    RulesError
        ``file:line: what is wrong``.
    """
    text, file = _read(source, name)
    ctx = _Ctx(file)
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 (safe loader subclass)
    except RulesError as e:
        raise RulesError(e.message, file, e.line) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise RulesError(f"YAML: {e.problem or e}", file, (mark.line + 1) if mark else 0) from None
    except yaml.YAMLError as e:
        raise RulesError(f"YAML: {e}", file, 0) from None
    if not isinstance(doc, dict) or "rules" not in doc:
        raise ctx.fail("top level must be a mapping with a 'rules:' list", _line(doc, None, 1))
    if extra := set(doc) - {"rules", "version"}:
        k = sorted(extra, key=str)[0]
        raise ctx.fail(f"unknown top-level key {k!r} (rules, version)", _line(doc, k, 1))
    rules = doc["rules"]
    if not isinstance(rules, list):
        raise ctx.fail("'rules' must be a list", _line(doc, "rules", 1))
    seen: set[str] = set()
    out = [ctx.rule(r, _line(rules, i, 1), seen) for i, r in enumerate(rules)]
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return RuleSet(tuple(r for r in out if r is not None), file, digest)


def _read(source: str | Path, name: str | None) -> tuple[str, str]:
    if isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))
    ):
        p = Path(source)
        try:
            return p.read_text(encoding="utf-8"), name or str(p)
        except OSError as e:
            raise RulesError(f"cannot read rules: {e.strerror}", str(p), 0) from None
    return str(source), name or "<rules>"
