"""Shared pytest fixtures. Each group lives in its own module and is imported here."""

import os
from pathlib import Path

import pytest

from tests.harness.browser import browser  # noqa: F401
from tests.harness.fixtures import ct_files, dcmtk, orthanc, orthanc_server  # noqa: F401

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_sessionstart(session: pytest.Session) -> None:
    # Most tests run on the real scanner data beside the checkout: without it they would skip
    # and the suite would pass without testing anything. Refuse instead.
    if not SHARED_DATA.is_dir() and not os.environ.get("SPRIM_TESTS_WITHOUT_DATA"):
        raise pytest.UsageError(
            f"real DICOM data not found at {SHARED_DATA} (the repository's ../shared/data); "
            "set SPRIM_TESTS_WITHOUT_DATA=1 to run only what does not need it"
        )
