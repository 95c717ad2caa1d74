"""Shared pytest fixtures. Each group lives in its own module and is imported here."""

from tests.harness.fixtures import ct_files, dcmtk, orthanc, orthanc_server  # noqa: F401
