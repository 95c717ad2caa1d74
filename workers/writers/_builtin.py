"""Imports the built-in writer modules so they register."""

from workers.writers import (
    derived_series,  # noqa: F401
    seg,  # noqa: F401
    stl,  # noqa: F401
)
