"""Pytest fixtures of the archive loop: a private Orthanc, the sample CT, dcmtk availability."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.harness.orthanc import OrthancServer, orthanc_available

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
CT_SERIES = DATA / "ct-abdomen-tcia" / "series"
#: The test Orthanc drops instances with this SeriesDescription (its Lua ReceivedInstanceFilter).
REJECTED_DESCRIPTION = "SPRIM-TEST-REJECT"


def _need(ok: bool, what: str) -> None:
    if not ok:
        pytest.skip(f"{what} not installed (make sysdeps)")


@pytest.fixture(scope="module")
def orthanc_server(tmp_path_factory) -> OrthancServer:
    """A private Orthanc (DICOMweb on, StableAge 1 s) for the module; stopped afterwards."""
    _need(orthanc_available(), "Orthanc + DICOMweb plugin")
    server = OrthancServer(
        tmp_path_factory.mktemp("orthanc"), stable_age=1, reject_description=REJECTED_DESCRIPTION
    )
    server.start()
    yield server
    server.close()


@pytest.fixture
def orthanc(orthanc_server: OrthancServer) -> OrthancServer:
    """The module's Orthanc, running and emptied for this test."""
    if not orthanc_server.running:
        orthanc_server.start()
    orthanc_server.reset()
    return orthanc_server


@pytest.fixture(scope="session")
def ct_files() -> list[Path]:
    """The 134 slices of the real abdomen CT (Implicit VR LE)."""
    files = sorted(CT_SERIES.glob("*.dcm"))
    if not files:
        pytest.skip(f"sample data missing: {CT_SERIES}")
    return files


@pytest.fixture(scope="session")
def dcmtk() -> None:
    _need(shutil.which("storescu") is not None, "dcmtk")
