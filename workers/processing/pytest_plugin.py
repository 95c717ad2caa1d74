"""pytest fixtures for step authors, installed with sprim (the ``sprim`` pytest11 entry point).

Any project that has sprim installed gets them in its tests, no conftest needed:

- ``ct_phantom`` / ``mr_phantom``: a small chest CT (40 slices of 128², 2.5 mm) and head MR
  phantom with their ground-truth masks (:mod:`pipelines.testing`);
- ``ct_source`` / ``mr_source``: the same phantoms written as DICOM series and read back
  (a ``SourceSeries``), once per test session;
- ``run_and_write``: :func:`workers.processing.testing.run_and_write` writing into the test's
  own temporary folder: ``run_and_write(source, steps) -> KitResult``;
- ``needs_dciodvfy``: skips the test, saying how to install it, when dciodvfy is missing.

The kit is imported when a fixture is first used, so the plugin costs nothing to test runs that
use none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pipelines.testing import ChestPhantom, HeadPhantom, chest_ct, head_mr

if TYPE_CHECKING:
    from workers.processing.testing import KitResult
    from workers.reading.source import SourceSeries


@pytest.fixture(scope="session")
def ct_phantom() -> ChestPhantom:
    """Chest CT phantom: 40 slices of 128 x 128, 2.5 mm isotropic, with ground-truth masks."""
    return chest_ct(n_slices=40, size=128, spacing=(2.5, 2.5, 2.5))


@pytest.fixture(scope="session")
def mr_phantom() -> HeadPhantom:
    """Head MR phantom (T1-like), 48 slices of 176 x 176, 1.2 x 1.2 x 4 mm."""
    return head_mr()


@pytest.fixture(scope="session")
def ct_source(ct_phantom: ChestPhantom, tmp_path_factory: pytest.TempPathFactory) -> SourceSeries:
    """``ct_phantom`` written as a CT Image Storage series and read back by sprim's reader."""
    from workers.processing.testing import read_source

    return read_source(ct_phantom.volume, tmp_path_factory.mktemp("ct-source"))


@pytest.fixture(scope="session")
def mr_source(mr_phantom: HeadPhantom, tmp_path_factory: pytest.TempPathFactory) -> SourceSeries:
    """``mr_phantom`` written as an MR Image Storage series and read back by sprim's reader."""
    from workers.processing.testing import read_source

    return read_source(mr_phantom.volume, tmp_path_factory.mktemp("mr-source"))


@pytest.fixture
def run_and_write(tmp_path: Path) -> Callable[..., KitResult]:
    """``run_and_write(source, steps, validate=True) -> KitResult``, outputs under ``tmp_path``."""
    from workers.processing import testing

    def run(source: Any, steps: Any, *, validate: bool = True) -> KitResult:
        return testing.run_and_write(source, steps, tmp_path, validate=validate)

    return run


@pytest.fixture
def needs_dciodvfy() -> str:
    """Path of dciodvfy; skips the test when it is not installed."""
    from workers.processing.testing import NO_DCIODVFY, dciodvfy

    exe = dciodvfy()
    if exe is None:
        pytest.skip(NO_DCIODVFY)
    return exe
