"""The routing attribute set: the only keywords a rule may test, declared once.

Every archive (folder, DICOMweb, the C-STORE listener's store) and ``sprim run`` give each series
exactly these attributes, so a rule matches the same series wherever the study comes from. The
rules loader refuses any other keyword. The table for rules authors is ``docs/rules.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Read from the series' first image (lowest InstanceNumber, then SOPInstanceUID). In an
#: enhanced (multi-frame) object a keyword missing at the top level is taken from its shared,
#: else first per-frame, functional groups (PixelSpacing, SliceThickness, ConvolutionKernel...).
IMAGE_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPClassUID",
    "Modality",
    "StudyDate",
    "AccessionNumber",
    "StudyDescription",
    "SeriesDescription",
    "SeriesNumber",
    "ProtocolName",
    "BodyPartExamined",
    "PatientPosition",
    "ImageType",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "ConvolutionKernel",
    "ContrastBolusAgent",
    "FrameOfReferenceUID",
    "InstitutionName",
    "StationName",
    "Manufacturer",
    "ManufacturerModelName",
)

#: Computed from every image of the series (see :func:`stack_attributes`).
DERIVED_KEYWORDS = ("NumberOfSeriesRelatedInstances", "NumberOfImages", "IsVolume")

ROUTING_KEYWORDS = IMAGE_KEYWORDS + DERIVED_KEYWORDS

#: Fewest images of a volume: with two, a stack has no spacing that could be checked.
MIN_VOLUME_IMAGES = 3

_COSINE_TOL = 1e-3  # same orientation: direction cosines equal to this
_POSITION_TOL_MM = 0.01  # same slice position along the normal

Geometry = tuple[Sequence[float] | None, Sequence[float] | None]


def stack_attributes(n_instances: int, frames: Sequence[Geometry]) -> dict[str, Any]:
    """Derived routing attributes of a series from the geometry of each of its images.

    Parameters
    ----------
    n_instances : int
        Instances (files) of the series.
    frames : sequence of (ImageOrientationPatient, ImagePositionPatient)
        One per image: per frame for a multi-frame object, per file for single-frame images;
        None where the image has no patient geometry.

    Returns
    -------
    dict
        ``NumberOfSeriesRelatedInstances``; ``NumberOfImages`` (frames of multi-frame objects,
        files of single-frame ones); ``IsVolume``: at least :data:`MIN_VOLUME_IMAGES` images
        that form one stack — one orientation, every image at its own position along the
        slice normal (several temporal positions, echoes or image types at the same positions
        are not one volume).
    """
    return {
        "NumberOfSeriesRelatedInstances": n_instances,
        "NumberOfImages": len(frames),
        "IsVolume": len(frames) >= MIN_VOLUME_IMAGES and _one_stack(frames),
    }


def _one_stack(frames: Sequence[Geometry]) -> bool:
    first = frames[0][0]
    if first is None or len(first) != 6:
        return False
    row, col = [float(x) for x in first[:3]], [float(x) for x in first[3:]]
    normal = (
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    )
    along = []
    for iop, ipp in frames:
        if iop is None or ipp is None or len(iop) != 6 or len(ipp) != 3:
            return False
        if any(abs(float(a) - b) > _COSINE_TOL for a, b in zip(iop, (*row, *col), strict=True)):
            return False
        along.append(sum(float(p) * n for p, n in zip(ipp, normal, strict=True)))
    along.sort()
    return all(b - a > _POSITION_TOL_MM for a, b in zip(along, along[1:], strict=False))
