"""Typed values that flow through pure pipeline steps.

Everything here is in patient coordinates (DICOM LPS, millimetres). Nothing here knows about
files, DICOM headers or networks: `workers/` turns these into DICOM objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Code:
    """A coded concept (value, scheme, meaning), e.g. SNOMED CT ``("39607008", "SCT", "Lung")``."""

    value: str
    scheme: str
    meaning: str


@dataclass
class Volume:
    """A source volume handed to a step.

    Attributes
    ----------
    image : sitk.Image
        3D scalar image, int16 (float32 when the rescale needs it), LPS geometry; CT in HU.
    modality : str
        DICOM Modality of the source series (CT, MR, PT, ...).
    series_description : str
        Source SeriesDescription, for naming outputs.
    """

    image: sitk.Image
    modality: str
    series_description: str = ""


@dataclass
class Output:
    """Base of everything a step returns."""

    kind: ClassVar[str] = "output"
    #: Short radiologist-readable label, becomes (part of) SeriesDescription: "COR 3mm AVG".
    description: str


@dataclass
class ImageSeries(Output):
    """A derived image series (reformat, slab, projection) on its own regular grid.

    Attributes
    ----------
    image : sitk.Image
        3D image; its direction cosines give the plane of each slice (slices along the third axis).
    plane : str
        ``axial``, ``coronal``, ``sagittal``, ``oblique`` or ``projection``.
    slab_thickness_mm : float or None
        Thickness each slice represents (SliceThickness); None = the grid spacing.
    slab_mode : str
        ``AVG``, ``MIP``, ``MinIP`` or ``NONE``: the derivation, for DerivationDescription.
    cine_rate : float or None
        Frames per second a viewer should play the series at (rotating MIP); None = not a cine.
    slice_geometry : sequence of (position, orientation) or None
        Per-slice ImagePositionPatient (3 floats) and ImageOrientationPatient (6 floats) when the
        slices are not one regular grid (rotating projections: each view has its own plane);
        None = derive from ``image``'s origin, spacing and direction.
    """

    kind: ClassVar[str] = "series"
    image: sitk.Image = None  # type: ignore[assignment]
    plane: str = "axial"
    slab_thickness_mm: float | None = None
    slab_mode: str = "NONE"
    cine_rate: float | None = None
    slice_geometry: Sequence[tuple[tuple[float, float, float], tuple[float, ...]]] | None = None


@dataclass(frozen=True)
class Segment:
    """One structure of a labelmap."""

    label: int
    name: str
    category: Code
    type: Code


@dataclass
class Labelmap(Output):
    """Segmentation on the source grid: voxel value = Segment.label, 0 = background.

    Segments do not overlap (one label per voxel). ``image`` is uint8 and shares the source
    image's size, spacing, origin and direction.
    """

    kind: ClassVar[str] = "labelmap"
    image: sitk.Image = None  # type: ignore[assignment]
    segments: Sequence[Segment] = field(default_factory=tuple)


@dataclass
class Mesh(Output):
    """Triangle surface in patient coordinates (LPS, mm)."""

    kind: ClassVar[str] = "mesh"
    vertices: np.ndarray = None  # type: ignore[assignment]  # (N, 3) float32
    faces: np.ndarray = None  # type: ignore[assignment]  # (M, 3) int32 vertex indices
    segment: Segment | None = None


class StepError(Exception):
    """A step cannot process this input. Deterministic: the job fails, no retry.

    The message is read by PACS administrators: say what is wrong with the input, not where
    the code stopped.
    """
