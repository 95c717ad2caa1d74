"""The steps a process knows: the built-in ones and those of installed plugins, loaded once.

Kept apart from :mod:`pipelines.registry` so the built-in step modules (which register through
the registry) and the loader that imports them do not import each other.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from pipelines.registry import Step, registered_steps

_loaded = False


def load_steps() -> None:
    """Import the built-in steps and every ``sprim.steps`` entry point (once per process)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import pipelines.steps  # noqa: F401  (built-in steps register on import)

    for ep in entry_points(group="sprim.steps"):
        ep.load()


def get_step(name: str) -> Step:
    """The registered step called ``name``; KeyError with the known names otherwise."""
    load_steps()
    steps = registered_steps()
    try:
        return steps[name]
    except KeyError:
        raise KeyError(
            f"unknown step {name!r}; known steps: {', '.join(sorted(steps))} (a plugin's steps "
            "are known once its module is named in SPRIM_PLUGINS or installed as a "
            "sprim.steps entry point)"
        ) from None


def all_steps() -> list[Step]:
    """Every registered step, sorted by name."""
    load_steps()
    steps = registered_steps()
    return [steps[k] for k in sorted(steps)]
