"""Imports the built-in writer modules so they register."""
