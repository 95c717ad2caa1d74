"""The step registry: every post-processing step, its typed params and version.

A step is a pure function ``fn(volume, params, prior=()) -> Output | list[Output]``; ``prior`` is
what earlier steps of the same job returned, for steps that build on them (a mesh of a labelmap).
Before it runs, its largest buffer is estimated from the source geometry
(:meth:`Step.check_output_size`), so absurd params are refused before memory is asked for.

This module only records steps; :mod:`pipelines.catalog` loads the built-in and plugin steps.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipelines.queues import QUEUES
from pipelines.types import Output, SegAlgorithm, StepError, Volume, output_kinds

_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")

#: A step function: ``fn(volume, params, prior=())`` or ``fn(volume, params)``, returning one
#: output or a list (of any Output subclasses: the registry checks the kinds at run time).
StepFn = Callable[..., Any]
#: ``estimate(params, shape_zyx, spacing_xyz, direction)`` -> (bytes, what): the step's largest
#: buffer for a source volume of that geometry, and a noun phrase naming it and the params that
#: size it ("an axial reformat of 480x480x300000 pixels (spacing_mm=0.001)").
Estimator = Callable[..., tuple[int, str]]
Shape = tuple[int, int, int]
Spacing = tuple[float, float, float]


def shape_text(shape_zyx: Sequence[int]) -> str:
    """``512x512x134`` (columns x rows x slices, as radiologists say it)."""
    return "x".join(str(int(n)) for n in reversed(tuple(shape_zyx)))


def size_text(n_bytes: float) -> str:
    """``150 GB``, ``312 MB``: binary units, as the limit is set in MB (2**20 bytes)."""
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes / 2**10:.3g} kB"


def default_estimate(
    params: BaseModel,
    shape_zyx: Shape,
    spacing_xyz: Spacing,
    direction: Sequence[float] | None = None,
) -> tuple[int, str]:
    """Steps that keep the source grid: one 4-byte working array (labels, float copy) of it."""
    n = int(np.prod(np.asarray(shape_zyx, dtype=np.float64)))
    return 4 * n, f"a working array on the {shape_text(shape_zyx)} source grid"


def param_range(field: FieldInfo) -> str:
    """A param's bounds as `sprim steps` shows them: ``[0.1, 500]``, ``(0, 2]``, ``1-64 chars``."""
    b: dict[str, object] = {}
    for m in field.metadata:
        for k in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            if getattr(m, k, None) is not None:
                b[k] = getattr(m, k)
    if "max_length" in b:
        return f"{b.get('min_length', 0)}-{b['max_length']} chars"

    def num(v: object) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    lo = ("[" + num(b["ge"])) if "ge" in b else ("(" + num(b["gt"])) if "gt" in b else "(-inf"
    hi = (num(b["le"]) + "]") if "le" in b else (num(b["lt"]) + ")") if "lt" in b else "inf)"
    return "" if lo == "(-inf" and hi == "inf)" else f"{lo}, {hi}"


def params_error_text(e: ValidationError) -> str:
    """One line per refused param, with the value given: ``spacing_mm=1e-06: Input should be ...``."""
    out = []
    for err in e.errors():
        where = ".".join(map(str, err.get("loc") or ())) or "params"
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f"={given!r}"[:60]
        out.append(f"{where}{shown}: {err['msg']}")
    return "; ".join(out)


@dataclass(frozen=True)
class Step:
    """A registered step.

    ``fn`` is the author's function as written; ``seg_algorithm`` describes how its labelmaps are
    made (SEG segment descriptions); ``drop_empty`` leaves empty outputs out instead of failing.
    """

    name: str
    version: str
    params: type[BaseModel]
    produces: tuple[str, ...]
    fn: StepFn
    summary: str
    resource: str = "cpu"
    estimate: Estimator = default_estimate
    seg_algorithm: SegAlgorithm = field(default_factory=SegAlgorithm)
    drop_empty: bool = False

    @property
    def origin(self) -> str:
        """``module.qualname`` of the step function: who registered it."""
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    def validate(self, values: dict[str, Any] | None = None) -> BaseModel:
        """Validate raw params (from YAML, CLI or API) into the step's params model.

        Raises pydantic's ``ValidationError``; :func:`params_error_text` words it for users.
        """
        return self.params.model_validate(values or {})

    def check_output_size(
        self,
        params: BaseModel,
        shape_zyx: Sequence[int],
        spacing_xyz: Sequence[float],
        max_bytes: int,
        direction: Sequence[float] | None = None,
    ) -> None:
        """StepError when this step's largest buffer on such a volume would exceed ``max_bytes``.

        ``shape_zyx`` and ``spacing_xyz`` are the source volume's (as read, or as the header
        claims); ``direction`` its 9 direction cosines when known (oblique sources resample).
        """
        shape = (int(shape_zyx[0]), int(shape_zyx[1]), int(shape_zyx[2]))
        spacing = (float(spacing_xyz[0]), float(spacing_xyz[1]), float(spacing_xyz[2]))
        n_bytes, what = self.estimate(params, shape, spacing, direction)
        if n_bytes > max_bytes:
            raise StepError(
                f"{what} would need {size_text(n_bytes)}, above the {max_bytes / 2**20:g} MB "
                "limit (SPRIM_MAX_VOLUME_MB)"
            )

    def __call__(
        self, volume: Volume, params: BaseModel, prior: Sequence[Output] = ()
    ) -> list[Output]:
        """Run the step; its outputs, each of a declared kind and none empty.

        StepError naming what is missing when an output is empty (every step gets this: a SEG
        without a voxel or an SR without a number is not written); with ``drop_empty`` empty
        outputs are left out, and only a step left with none fails.
        """
        if len(inspect.signature(self.fn).parameters) >= 3:
            out = self.fn(volume, params, prior)
        else:
            out = self.fn(volume, params)
        outs: list[Output] = out if isinstance(out, list) else [out]
        for o in outs:
            if not isinstance(o, Output) or o.kind not in self.produces:
                got = o.kind if isinstance(o, Output) else type(o).__name__
                raise TypeError(f"step {self.name} returned {got}, declared {self.produces}")
        reasons = [(o, r) for o in outs if (r := o.empty_reason())]
        if reasons and (not self.drop_empty or len(reasons) == len(outs)):
            raise StepError(f"{self.name} produced nothing to write: {reasons[0][1]}")
        return [o for o in outs if all(o is not e for e, _ in reasons)]


def canonical_params(params: BaseModel) -> str:
    """Stable text of params (sorted keys, all defaults filled): UID entropy and provenance."""
    return json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


_REGISTRY: dict[str, Step] = {}


def step(
    name: str,
    *,
    version: str,
    params: type[BaseModel],
    produces: str | tuple[str, ...],
    resource: str = "cpu",
    estimate: Estimator | None = None,
    seg_algorithm: SegAlgorithm | None = None,
    drop_empty: bool = False,
) -> Callable[[StepFn], StepFn]:
    """Register a pure step; validates name, version, params model and docstring at import.

    ``produces`` names registered output kinds (:func:`pipelines.types.output_kinds`).
    ``resource`` is the queue its jobs run on (:data:`pipelines.queues.QUEUES`).
    ``estimate`` sizes the step's largest buffer (see :data:`Estimator`); by default one 4-byte
    array on the source grid. Give one when the output grid follows the params (reformats,
    projections) so absurd params are refused before any memory is asked for.
    ``seg_algorithm`` (labelmap steps) is the SEG algorithm family and type; by default
    Morphological Operations, AUTOMATIC. ``drop_empty``: see :class:`Step`.

    Registering the same function again (its module imported twice) replaces it silently;
    another function under a registered name is refused, naming both modules.
    """
    produces_t = (produces,) if isinstance(produces, str) else tuple(produces)

    def register(fn: StepFn) -> StepFn:
        _check_declaration(name, version, params, produces_t, resource, seg_algorithm)
        doc = _step_doc(name, fn)
        new = Step(
            name,
            version,
            params,
            produces_t,
            fn,
            doc.splitlines()[0],
            resource,
            estimate or default_estimate,
            seg_algorithm or SegAlgorithm(),
            drop_empty,
        )
        old = _REGISTRY.get(name)
        if old is not None and old.origin != new.origin:
            raise ValueError(
                f"step {name} is registered twice: by {old.origin} and by {new.origin}"
            )
        _REGISTRY[name] = new
        return fn

    return register


def _check_declaration(
    name: str,
    version: str,
    params: type[BaseModel],
    produces: tuple[str, ...],
    resource: str,
    seg_algorithm: SegAlgorithm | None,
) -> None:
    """Refuse a step whose name, version, params, output kinds, queue or SEG family is wrong."""
    if not _NAME.match(name):
        raise ValueError(f"step name {name!r} must be dotted lower case, e.g. 'reformat.mpr'")
    if not _SEMVER.match(version):
        raise ValueError(f"step {name}: version {version!r} is not semver (1.2.3)")
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise TypeError(f"step {name}: params must be a pydantic model class")
    kinds = output_kinds()
    if not produces or (bad := [k for k in produces if k not in kinds]):
        raise ValueError(
            f"step {name}: unknown output kind(s) {bad if produces else '(none)'}; known: "
            f"{', '.join(sorted(kinds))} (a new kind is an Output subclass registered "
            "with pipelines.types.output_kind)"
        )
    if resource not in QUEUES:
        raise ValueError(
            f"step {name}: resource {resource!r} is not a queue; one of {', '.join(QUEUES)}"
        )
    if seg_algorithm is not None and "labelmap" not in produces:
        raise ValueError(f"step {name}: seg_algorithm is for steps that produce a labelmap")


def _step_doc(name: str, fn: StepFn) -> str:
    """The step function's docstring, refused when missing or when it takes under 2 arguments."""
    doc = inspect.getdoc(fn)
    if not doc:
        raise ValueError(f"step {name}: a docstring is required (it is shown by `sprim steps`)")
    sig = inspect.signature(fn)
    if len(sig.parameters) < 2:
        raise TypeError(f"step {name}: signature must be fn(volume, params, prior=())")
    return doc


def registered(name: str) -> Step:
    """The step registered as ``name`` so far (no loading: see :func:`pipelines.catalog.get_step`)."""
    return _REGISTRY[name]


def registered_steps() -> dict[str, Step]:
    """Every step registered so far, by name (no loading)."""
    return dict(_REGISTRY)
