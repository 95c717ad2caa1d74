"""Extra step modules named by ``SPRIM_PLUGINS`` (comma-separated), imported once per process.

Installed packages register through the ``sprim.steps`` entry-point group instead; this is for
site modules and tests.
"""

from __future__ import annotations

import importlib

from workers.core.config import settings

_done: set[str] = set()


class PluginError(ImportError):
    """A module named in ``SPRIM_PLUGINS`` cannot be imported; the message is one line."""


def load_plugins() -> list[str]:
    """Import every module of ``SPRIM_PLUGINS`` not imported yet; return their names.

    :class:`PluginError` names the module and why (not found, or what its import raised).
    """
    names = [n.strip() for n in settings().plugins.split(",") if n.strip()]
    for n in names:
        if n in _done:
            continue
        try:
            importlib.import_module(n)
        except ModuleNotFoundError as e:
            missing = f"no module {e.name!r}" if e.name and e.name != n else "no such module"
            raise PluginError(
                f"SPRIM_PLUGINS={settings().plugins!r}: cannot import {n!r}: {missing} "
                "(a module importable by this Python, e.g. mypackage.steps)"
            ) from e
        except Exception as e:  # the plugin's own code failed: say which and how, in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise PluginError(
                f"SPRIM_PLUGINS: importing {n!r} failed: {type(e).__name__}"
                + (f": {first}" if first else "")
            ) from e
        _done.add(n)
    return names
