"""Synthetic studies made from real slices: new Study/Series/SOP UIDs, same pixels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

PREFIX = "1.2.826.0.1.3680043.8.498."


def copy_as_new_study(
    files: Sequence[Path],
    out_dir: Path,
    tag: str,
    *,
    series: int = 1,
    edit=None,
) -> tuple[str, list[Path]]:
    """Write ``files`` as a new study (``series`` series, files split evenly); return (UID, paths).

    UIDs derive from ``tag``, so the same tag always gives the same study. ``edit(ds)`` may change
    each dataset before it is written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = generate_uid(PREFIX, entropy_srcs=[tag, "study"])
    out = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        k = i % series
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid(PREFIX, entropy_srcs=[tag, "series", str(k)])
        ds.SOPInstanceUID = generate_uid(PREFIX, entropy_srcs=[tag, "sop", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 100 + k
        ds.AccessionNumber = tag[:16]
        if edit:
            edit(ds)
        p = out_dir / f"{tag}-{i:04d}.dcm"
        ds.save_as(p)
        out.append(p)
    return study, out
