"""The closed operator set of routing conditions, compiled to plain predicates.

A condition is ``{operator: operand, ...}`` on one attribute (all operators must hold); a bare
scalar is shorthand for ``eq``. Nothing is ever ``eval``-ed. A missing, empty or odd value makes a
condition false (never raises); :func:`Condition.why_not` says why, for ``explain``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

OPERATORS = ("eq", "in", "regex", "lt", "lte", "gt", "gte", "contains", "contains_all", "exists")

_MISSING = object()


def _is_empty(v: Any) -> bool:
    return v is None or v == "" or (isinstance(v, list | tuple) and len(v) == 0)


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    if isinstance(v, list | tuple) and len(v) == 1:
        return _num(v[0])
    return None


def _is_number(v: Any) -> bool:
    try:
        return _num(v) is not None
    except OverflowError:  # an integer beyond float is still a number
        return True


def _items(v: Any) -> list[Any]:
    """A value as a list of items: lists as is, backslash-separated strings split (ImageType)."""
    if isinstance(v, list | tuple):
        return list(v)
    if isinstance(v, str) and "\\" in v:
        return v.split("\\")
    return [v]


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        return False
    na, nb = _num(a), _num(b)
    return na is not None and nb is not None and na == nb


def _op_eq(v: Any, x: Any) -> bool:
    if isinstance(v, list | tuple) and not isinstance(x, list):
        return len(v) == 1 and _same(v[0], x)
    return _same(v, x)


def _op_in(v: Any, xs: list[Any]) -> bool:
    return any(_same(i, x) for i in _items(v) for x in xs)


def _cmp(fn: Callable[[float, float], bool]) -> Callable[[Any, Any], bool]:
    def op(v: Any, x: float) -> bool:
        n = _num(v)
        return n is not None and fn(n, float(x))

    return op


def _op_contains(v: Any, x: Any) -> bool:
    if isinstance(v, str) and "\\" not in v:
        return str(x) in v
    return any(_same(i, x) for i in _items(v))


def _op_contains_all(v: Any, xs: list[Any]) -> bool:
    items = _items(v)
    return all(any(_same(i, x) for i in items) for x in xs)


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": _op_eq,
    "in": _op_in,
    "lt": _cmp(lambda a, b: a < b),
    "lte": _cmp(lambda a, b: a <= b),
    "gt": _cmp(lambda a, b: a > b),
    "gte": _cmp(lambda a, b: a >= b),
    "contains": _op_contains,
    "contains_all": _op_contains_all,
}
_WORDS = {
    "eq": "!=",
    "in": "not in",
    "lt": "not <",
    "lte": "not <=",
    "gt": "not >",
    "gte": "not >=",
    "contains": "does not contain",
    "contains_all": "does not contain all of",
    "regex": "does not match regex",
}


@dataclass(frozen=True)
class Condition:
    """One attribute test: ``key`` (DICOM keyword or context key) and its operators."""

    key: str
    ops: tuple[tuple[str, Any], ...]
    line: int = 0
    #: Specialised predicate of a present value (None: use the generic path).
    fast: Callable[[Any], bool] | None = field(default=None, compare=False, repr=False)

    def test(self, attrs: Mapping[str, Any]) -> bool:
        """True when every operator holds; False for a missing or odd value. Never raises."""
        v = attrs.get(self.key, _MISSING)
        if self.fast is not None:
            return _fast_holds(self.fast, v)
        return all(_holds(op, x, v) for op, x in self.ops)

    def why_not(self, attrs: Mapping[str, Any]) -> str | None:
        """None when the condition holds, else a one-line reason naming the attribute."""
        if self.test(attrs):
            return None
        v = attrs.get(self.key, _MISSING)
        for op, x in self.ops:
            if op == "exists":
                return f"{self.key}: {'missing' if x else f'present ({v!r})'}, want exists: {x}"
            if v is _MISSING or _is_empty(v):
                return f"{self.key}: missing (want {op} {_show(x)})"
            if not Condition(self.key, ((op, x),)).test(attrs):
                if op in ("lt", "lte", "gt", "gte") and not _is_number(v):
                    return f"{self.key}: {v!r} is not a number (want {op} {_show(x)})"
                return f"{self.key}: {v!r} {_WORDS[op]} {_show(x)}"
        return f"{self.key}: {v!r} does not match"

    def describe(self) -> str:
        return f"{self.key} " + " and ".join(f"{op} {_show(x)}" for op, x in self.ops)


#: What an odd attribute value can raise in an operator: a number beyond float (``float(10**400)``
#: in :func:`_num`: OverflowError), a value whose ``==`` is not a bool or an int too long for
#: ``str`` (ValueError), one-item lists nested past the recursion limit (:func:`_num`). TypeError,
#: AttributeError, LookupError and re.error (patterns are compiled at load) guard value types no
#: archive gives today.
_ODD_VALUE_ERRORS = (
    TypeError,
    ValueError,
    AttributeError,
    ArithmeticError,
    LookupError,
    RecursionError,
    re.error,
)


def _fast_holds(fast: Callable[[Any], bool], v: Any) -> bool:
    """The specialised predicate on a present value; False for a missing or odd one."""
    if v is _MISSING or v is None or v == "" or v == []:
        return False
    try:
        return fast(v)
    except _ODD_VALUE_ERRORS:  # an odd value never crashes routing
        return False


def _holds(op: str, x: Any, v: Any) -> bool:
    """One operator on ``v`` (``_MISSING`` when absent); False for a missing or odd value."""
    absent = v is _MISSING or _is_empty(v)
    if op == "exists":
        return absent != bool(x)
    if absent:
        return False
    try:
        return _apply(op, x, v)
    except _ODD_VALUE_ERRORS:  # an odd value never crashes routing
        return False


def _apply(op: str, x: Any, v: Any) -> bool:
    if op == "regex":
        s = "\\".join(map(str, v)) if isinstance(v, list | tuple) else str(v)
        return bool(x.search(s))
    return bool(_OPS[op](v, x))


def _show(x: Any) -> str:
    return repr(x.pattern) if isinstance(x, re.Pattern) else repr(x)


def compile_condition(key: str, spec: Any, line: int = 0) -> Condition:
    """Build a :class:`Condition` from its YAML form; ValueError with what is wrong.

    The error message is for a rules author: it names the operator and the expected operand.
    """
    if not isinstance(spec, dict):
        spec = {"eq": spec}
    if not spec:
        raise ValueError(f"{key}: empty condition; use one of {', '.join(OPERATORS)}")
    ops = tuple((op, _operand(key, op, x)) for op, x in spec.items())
    return Condition(key, ops, line, _fast(ops))


def _operand(key: str, op: str, x: Any) -> Any:
    """The operand of ``op`` checked (a regex compiled); ValueError naming what ``op`` needs."""
    if op not in OPERATORS:
        raise ValueError(f"{key}: unknown operator {op!r}; known: {', '.join(OPERATORS)}")
    return _OPERAND_CHECKS.get(op, _scalar_operand)(key, op, x)


def _list_operand(key: str, op: str, x: Any) -> Any:
    if not isinstance(x, list) or not x:
        raise ValueError(f"{key}: {op} needs a non-empty list, got {x!r}")
    return x


def _number_operand(key: str, op: str, x: Any) -> Any:
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise ValueError(f"{key}: {op} needs a number, got {x!r}")
    return x


def _bool_operand(key: str, op: str, x: Any) -> Any:
    if not isinstance(x, bool):
        raise ValueError(f"{key}: exists needs true or false, got {x!r}")
    return x


def _regex_operand(key: str, op: str, x: Any) -> Any:
    if not isinstance(x, str):
        raise ValueError(f"{key}: regex needs a string, got {x!r}")
    try:
        return re.compile(x)
    except re.error as e:
        raise ValueError(f"{key}: bad regex {x!r}: {e}") from None


def _scalar_operand(key: str, op: str, x: Any) -> Any:
    """``eq`` takes any YAML value (a list is compared whole); ``contains`` a scalar."""
    if isinstance(x, dict | list) and op != "eq":
        raise ValueError(f"{key}: {op} needs a scalar, got {x!r}")
    return x


_OPERAND_CHECKS: dict[str, Callable[[str, str, Any], Any]] = {
    "in": _list_operand,
    "contains_all": _list_operand,
    "lt": _number_operand,
    "lte": _number_operand,
    "gt": _number_operand,
    "gte": _number_operand,
    "exists": _bool_operand,
    "regex": _regex_operand,
}


def _fast_one(op: str, x: Any) -> Callable[[Any], bool] | None:
    """A predicate equivalent to the generic path, quicker for the common value types."""
    if op == "eq" and isinstance(x, str):
        return lambda v: v == x or (not isinstance(v, str) and _op_eq(v, x))
    if op == "in" and all(isinstance(i, str) for i in x):
        fs = frozenset(x)
        return lambda v: v in fs if isinstance(v, str) and "\\" not in v else _op_in(v, x)
    if op in ("lt", "lte", "gt", "gte"):
        generic = _OPS[op]
        import operator

        cmp = {"lt": operator.lt, "lte": operator.le, "gt": operator.gt, "gte": operator.ge}[op]
        return lambda v: cmp(v, x) if type(v) in (int, float) else generic(v, x)
    if op == "regex":
        search = x.search
        return lambda v: (
            (search(v) is not None)
            if isinstance(v, str)
            else bool(search("\\".join(map(str, v)) if isinstance(v, list | tuple) else str(v)))
        )
    if op == "contains_all" and all(isinstance(i, str) for i in x):
        need = frozenset(x)
        return lambda v: (
            need.issubset(v)
            if isinstance(v, list) and all(type(i) is str for i in v)
            else _op_contains_all(v, x)
        )
    return None


def _fast(ops: tuple[tuple[str, Any], ...]) -> Callable[[Any], bool] | None:
    preds = [p for op, x in ops if (p := _fast_one(op, x)) is not None]
    if len(preds) < len(ops):
        return None
    if len(preds) == 1:
        return preds[0]
    return lambda v: all(p(v) for p in preds)
