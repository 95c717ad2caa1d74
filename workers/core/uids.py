"""Deterministic UIDs for derived objects (docs/dicom.md).

The same (source series, rule, step, version, params, output) always yields the same UIDs, so a
retried or repeated job replaces its output in the archive instead of duplicating it.
"""

from __future__ import annotations

from pydicom.uid import generate_uid

from workers.core.config import settings


def derive_uid(*parts: str | int) -> str:
    """A UID under the configured prefix, derived from ``parts`` (all significant, in order)."""
    return generate_uid(prefix=settings().uid_prefix, entropy_srcs=[str(p) for p in parts])


class OutputUIDs:
    """UIDs of one derived output: one series, its instances, in the source study.

    Parameters
    ----------
    source_series_uid, rule, step_name, step_version, params_canonical : str
        What identifies the computation (see :func:`pipelines.canonical_params`).
    output_key : str
        Distinguishes several outputs of one step (e.g. the plane ``coronal``).
    """

    def __init__(
        self,
        source_series_uid: str,
        rule: str,
        step_name: str,
        step_version: str,
        params_canonical: str,
        output_key: str,
    ) -> None:
        self._key = (source_series_uid, rule, step_name, step_version, params_canonical, output_key)

    @property
    def series_uid(self) -> str:
        return derive_uid(*self._key, "series")

    def instance_uid(self, index: int) -> str:
        return derive_uid(*self._key, "instance", index)

    def uid(self, what: str) -> str:
        """Any other UID of this output (e.g. a SEG's FrameOfReference is the source's)."""
        return derive_uid(*self._key, what)
