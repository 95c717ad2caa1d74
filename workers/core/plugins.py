"""Extra step modules named by ``SPRIM_PLUGINS`` (comma-separated), imported once per process.

Installed packages register through the ``sprim.steps`` entry-point group instead; this is for
site modules and tests.
"""

from __future__ import annotations

import importlib

from workers.core.config import settings

_done: set[str] = set()


def load_plugins() -> list[str]:
    """Import every module of ``SPRIM_PLUGINS`` not imported yet; return their names."""
    names = [n.strip() for n in settings().plugins.split(",") if n.strip()]
    for n in names:
        if n not in _done:
            importlib.import_module(n)
            _done.add(n)
    return names
