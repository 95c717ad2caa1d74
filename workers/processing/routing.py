"""The current rule set of this process, hot-reloaded from ``SPRIM_RULES_FILE``.

Each call to :func:`current_rules` checks the file's modification time (a stat); a changed file
is loaded and validated, and replaces the rule set only if valid — a bad edit never replaces a
good rule set. Both outcomes are recorded in the job store's audit trail.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from pipelines.rules import RulesError, RuleSet, load_rules

log = logging.getLogger("sprim.rules")

DEFAULT_RULES = Path(__file__).with_name("default_rules.yaml")


def load_rules_file(path: Path | str) -> RuleSet:
    """Load and validate a rules file (plugin steps known); :class:`RulesError` if bad."""
    from workers.core.plugins import load_plugins

    load_plugins()
    return load_rules(Path(path))


class RuleSource:
    """A rules file watched for changes (see module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._rules: RuleSet | None = None
        self.last_error: RulesError | None = None

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def get(self, store=None) -> RuleSet:
        """The current valid rule set (reloaded if the file changed and validates)."""
        stamp = self._stat()
        if self._rules is not None and stamp == self._stamp:
            return self._rules
        with self._lock:
            if self._rules is not None and stamp == self._stamp:
                return self._rules
            try:
                new = load_rules_file(self.path)
            except RulesError as e:
                if self._rules is None:
                    raise
                self._stamp = stamp  # do not re-parse the same bad text on every call
                self.last_error = e
                log.error("event=rules_refused file=%s error=%s", self.path, e)
                if store is not None:
                    store.audit("rules_refused", f"{e} (kept {self._rules.digest})", actor="rules")
                return self._rules
            old = self._rules
            self._rules, self._stamp, self.last_error = new, stamp, None
            if old is None or old.digest != new.digest:
                what = f"{self.path} digest {new.digest}: {len(new)} rules ({', '.join(r.name for r in new.rules)})"
                if old is not None:
                    what += f"; replaced {old.digest}"
                log.info(
                    "event=rules_loaded file=%s digest=%s rules=%d", self.path, new.digest, len(new)
                )
                if store is not None and old is not None:
                    store.audit("rules_reload", what, actor="rules")
                elif store is not None:
                    store.audit("rules_loaded", what, actor="rules")
            return new


_SOURCES: dict[Path, RuleSource] = {}


def rules_path() -> Path:
    from workers.core.config import settings

    return Path(settings().rules_file or DEFAULT_RULES)


def current_rules(store=None, path: Path | str | None = None) -> RuleSet:
    """This process's rule set for ``path`` (default ``SPRIM_RULES_FILE`` or built-in)."""
    p = Path(path) if path else rules_path()
    src = _SOURCES.get(p)
    if src is None:
        src = _SOURCES.setdefault(p, RuleSource(p))
    return src.get(store)
