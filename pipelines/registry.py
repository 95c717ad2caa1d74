"""The step registry: every post-processing step, its typed params and version.

A step is a pure function ``fn(volume, params, prior=()) -> Output | list[Output]``; ``prior`` is
what earlier steps of the same job returned, for steps that build on them (a mesh of a labelmap).
Before it runs, its largest buffer is estimated from the source geometry
(:meth:`Step.check_output_size`), so absurd params are refused before memory is asked for.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

import numpy as np
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipelines.types import Output, StepError, Volume

_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
KINDS = ("series", "labelmap", "mesh")

StepFn = Callable[..., Output | list[Output]]
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
    params: BaseModel, shape_zyx: Shape, spacing_xyz: Spacing, direction=None
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
    """A registered step."""

    name: str
    version: str
    params: type[BaseModel]
    produces: tuple[str, ...]
    fn: StepFn
    summary: str
    resource: str = "cpu"
    estimate: Estimator = default_estimate

    def validate(self, values: dict | None = None) -> BaseModel:
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
        shape = tuple(int(n) for n in shape_zyx)
        spacing = tuple(float(s) for s in spacing_xyz)
        n_bytes, what = self.estimate(params, shape, spacing, direction)
        if n_bytes > max_bytes:
            raise StepError(
                f"{what} would need {size_text(n_bytes)}, above the {max_bytes / 2**20:g} MB "
                "limit (SPRIM_MAX_VOLUME_MB)"
            )

    def __call__(
        self, volume: Volume, params: BaseModel, prior: Sequence[Output] = ()
    ) -> list[Output]:
        out = self.fn(volume, params, prior)
        outs = out if isinstance(out, list) else [out]
        for o in outs:
            if o.kind not in self.produces:
                raise TypeError(f"step {self.name} returned {o.kind}, declared {self.produces}")
        return outs


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
) -> Callable[[StepFn], StepFn]:
    """Register a pure step; validates name, version, params model and docstring at import.

    ``estimate`` sizes the step's largest buffer (see :data:`Estimator`); by default one 4-byte
    array on the source grid. Give one when the output grid follows the params (reformats,
    projections) so absurd params are refused before any memory is asked for.
    """
    produces_t = (produces,) if isinstance(produces, str) else tuple(produces)

    def register(fn: StepFn) -> StepFn:
        if not _NAME.match(name):
            raise ValueError(f"step name {name!r} must be dotted lower case, e.g. 'reformat.mpr'")
        if not _SEMVER.match(version):
            raise ValueError(f"step {name}: version {version!r} is not semver (1.2.3)")
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise TypeError(f"step {name}: params must be a pydantic model class")
        if bad := [k for k in produces_t if k not in KINDS]:
            raise ValueError(f"step {name}: unknown output kind(s) {bad}; known: {KINDS}")
        doc = inspect.getdoc(fn)
        if not doc:
            raise ValueError(f"step {name}: a docstring is required (it is shown by `sprim steps`)")
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"step {name} is registered twice")
        sig = inspect.signature(fn)
        if len(sig.parameters) < 2:
            raise TypeError(f"step {name}: signature must be fn(volume, params, prior=())")
        n_args = len(sig.parameters)
        call = fn if n_args >= 3 else (lambda v, p, prior=(): fn(v, p))
        _REGISTRY[name] = Step(
            name,
            version,
            params,
            produces_t,
            call,
            doc.splitlines()[0],
            resource,
            estimate or default_estimate,
        )
        return fn

    return register


_loaded = False


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import pipelines.steps  # noqa: F401  (built-in steps register on import)

    for ep in entry_points(group="sprim.steps"):
        ep.load()


def get_step(name: str) -> Step:
    """The registered step called ``name``; KeyError with the known names otherwise."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown step {name!r}; known steps: {', '.join(sorted(_REGISTRY))}"
        ) from None


def all_steps() -> list[Step]:
    """Every registered step, sorted by name."""
    _load()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
