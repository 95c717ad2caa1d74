"""The step registry: every post-processing step, its typed params and version.

A step is a pure function ``fn(volume, params, prior=()) -> Output | list[Output]``; ``prior`` is
what earlier steps of the same job returned, for steps that build on them (a mesh of a labelmap).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

from pydantic import BaseModel

from pipelines.types import Output, Volume

_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
KINDS = ("series", "labelmap", "mesh")

StepFn = Callable[..., Output | list[Output]]


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

    def validate(self, values: dict | None = None) -> BaseModel:
        """Validate raw params (from YAML, CLI or API) into the step's params model."""
        return self.params.model_validate(values or {})

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
) -> Callable[[StepFn], StepFn]:
    """Register a pure step; validates name, version, params model and docstring at import."""
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
            name, version, params, produces_t, call, doc.splitlines()[0], resource
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
