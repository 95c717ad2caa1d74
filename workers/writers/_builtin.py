"""Imports the built-in writer modules so they register."""

from workers.writers import derived_series  # noqa: F401
