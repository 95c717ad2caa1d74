"""Interfaces for people and programs: the ``sprim`` command line and the REST API."""
