"""Typed values that flow through pure pipeline steps.

Everything here is in patient coordinates (DICOM LPS, millimetres). Nothing here knows about
files, DICOM headers or networks: `workers/` turns these into DICOM objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

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
    """Base of everything a step returns.

    A subclass is a new output kind once registered with :func:`output_kind`; `workers/` needs a
    writer for it before its outputs can become DICOM objects.
    """

    kind: ClassVar[str] = "output"
    #: Short radiologist-readable label, becomes (part of) SeriesDescription: "COR 3mm AVG".
    description: str

    def empty_reason(self) -> str | None:
        """Why this output holds nothing worth writing (None = it holds something).

        The step registry turns a non-None answer into a :class:`StepError` for every step.
        """
        return None


_O = TypeVar("_O", bound=type[Output])
_KINDS: dict[str, type[Output]] = {}


def output_kind(cls: _O) -> _O:
    """Class decorator: ``cls.kind`` becomes a kind steps may declare in ``produces``.

    Registering the same class again (a module imported twice) is harmless; another class under
    a kind already registered is refused, naming both.
    """
    kind = cls.kind
    if not isinstance(kind, str) or not kind.isidentifier() or kind == Output.kind:
        raise ValueError(f"{cls.__qualname__}: kind must be a lower-case word, got {kind!r}")
    known = _KINDS.get(kind)
    if known is not None and _origin(known) != _origin(cls):
        raise ValueError(
            f"output kind {kind!r} is registered twice: {_origin(known)} and {_origin(cls)}"
        )
    _KINDS[kind] = cls
    return cls


def _origin(obj: type | object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"


def output_kinds() -> dict[str, type[Output]]:
    """Every registered output kind and its class."""
    return dict(_KINDS)


@output_kind
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
    slice_geometry: Sequence[tuple[tuple[float, ...], tuple[float, ...]]] | None = None

    def empty_reason(self) -> str | None:
        if self.image is None or 0 in self.image.GetSize():
            return f"the series {self.description!r} has no image"
        return None


@dataclass(frozen=True)
class Segment:
    """One structure of a labelmap."""

    label: int
    name: str
    category: Code
    type: Code


@output_kind
@dataclass
class Labelmap(Output):
    """Segmentation on the source grid: voxel value = Segment.label, 0 = background.

    Segments do not overlap (one label per voxel). ``image`` is uint8 and shares the source
    image's size, spacing, origin and direction.
    """

    kind: ClassVar[str] = "labelmap"
    image: sitk.Image = None  # type: ignore[assignment]
    segments: Sequence[Segment] = field(default_factory=tuple)

    def empty_reason(self) -> str | None:
        names = " or ".join(s.name for s in self.segments) or "any segment"
        if self.image is None or not self.segments:
            return f"the labelmap {self.description!r} has no segments"
        labels = sitk.GetArrayViewFromImage(self.image)
        wanted = [s.label for s in self.segments]
        # Slice by slice, stopping at the first hit: no volume-sized temporary (512x512x400:
        # 0.05 s instead of 0.74 s for whole-volume comparisons).
        for plane in labels.reshape(-1, *labels.shape[-2:]):
            if plane.any() and np.isin(plane, wanted).any():
                return None
        return f"no voxel of {names} was found in this series"


@output_kind
@dataclass
class Mesh(Output):
    """Triangle surface in patient coordinates (LPS, mm)."""

    kind: ClassVar[str] = "mesh"
    vertices: np.ndarray = None  # type: ignore[assignment]  # (N, 3) float32
    faces: np.ndarray = None  # type: ignore[assignment]  # (M, 3) int32 vertex indices
    segment: Segment | None = None

    def empty_reason(self) -> str | None:
        if self.vertices is None or self.faces is None or len(self.faces) == 0:
            what = f"segment {self.segment.name!r}" if self.segment else repr(self.description)
            return f"the surface of {what} has no triangles"
        return None


#: UCUM units common in imaging measurements (scheme "UCUM"; value = the UCUM expression).
MILLILITER = Code("ml", "UCUM", "milliliter")
MILLIMETER = Code("mm", "UCUM", "millimeter")
SQUARE_MILLIMETER = Code("mm2", "UCUM", "square millimeter")
HOUNSFIELD_UNIT = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNITS = Code("1", "UCUM", "no units")


@dataclass(frozen=True)
class Measurement:
    """One numeric measurement, as a TID 300 Measurement of a TID 1500 report.

    Attributes
    ----------
    name : Code
        What is measured (concept name), e.g. SNOMED CT ``("118565006", "SCT", "Volume")`` or
        DCM ``("112031", "DCM", "Attenuation Coefficient")`` for a CT density.
    value : float
        The number, in ``unit``. Must be finite.
    unit : Code
        A UCUM unit (scheme ``UCUM``), e.g. :data:`MILLILITER`, :data:`HOUNSFIELD_UNIT`.
    segment : Segment or None
        The structure measured: a segment of a labelmap (of this job when the SR should reference
        its SEG). None = the measurement is of the whole series.
    method : Code or None
        How it was measured (CID 7474), e.g. ``("126030", "DCM", "Sum of segmented voxel
        method for volume")``.
    derivation : Code or None
        A statistic over the region (CID 7464), e.g. SCT ``("373098007", "SCT", "Mean")``.
    """

    name: Code
    value: float
    unit: Code
    segment: Segment | None = None
    method: Code | None = None
    derivation: Code | None = None


@output_kind
@dataclass
class Measurements(Output):
    """Numeric measurements of the source series (and of segments), written as a TID 1500 SR.

    Measurements of one segment are grouped (one Volumetric ROI group, referencing the segment
    in the SEG when the same job wrote it); those without a segment form one group of their own.
    """

    kind: ClassVar[str] = "measurements"
    measurements: Sequence[Measurement] = field(default_factory=tuple)

    def empty_reason(self) -> str | None:
        if not self.measurements:
            return f"{self.description!r} holds no measurement"
        return None

    def __post_init__(self) -> None:
        for m in self.measurements:
            if m.unit.scheme != "UCUM":
                raise ValueError(f"measurement {m.name.meaning}: unit {m.unit} is not UCUM")
            if not np.isfinite(m.value):
                raise StepError(f"measurement {m.name.meaning} is not a number ({m.value})")

    def by_segment(self) -> dict[Segment | None, list[Measurement]]:
        """Measurements grouped by segment (None first when present), in order of appearance."""
        groups: dict[Segment | None, list[Measurement]] = {}
        for m in sorted(self.measurements, key=lambda m: m.segment is not None):
            groups.setdefault(m.segment, []).append(m)
        return groups


#: SEG algorithm types (SegmentAlgorithmType) a step may declare; MANUAL is not a step's.
SEG_ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC")
#: CID 7162 "Surface Processing Algorithm Families": thresholds, components, morphology.
MORPHOLOGICAL_OPERATIONS = Code("123104", "DCM", "Morphological Operations")
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")


@dataclass(frozen=True)
class SegAlgorithm:
    """How a step's labelmaps were made, for the SEG's segment descriptions.

    ``family`` is a CID 7162 code (:data:`MORPHOLOGICAL_OPERATIONS`,
    :data:`ARTIFICIAL_INTELLIGENCE`, ...); ``type`` is ``AUTOMATIC`` or ``SEMIAUTOMATIC``.
    """

    family: Code = MORPHOLOGICAL_OPERATIONS
    type: str = "AUTOMATIC"

    def __post_init__(self) -> None:
        if self.type not in SEG_ALGORITHM_TYPES:
            raise ValueError(
                f"SEG algorithm type {self.type!r}: one of {', '.join(SEG_ALGORITHM_TYPES)}"
            )
        if self.family.scheme != "DCM":
            raise ValueError(f"SEG algorithm family {self.family} is not a CID 7162 (DCM) code")


class StepError(Exception):
    """A step cannot process this input. Deterministic: the job fails, no retry.

    The message is read by PACS administrators: say what is wrong with the input, not where
    the code stopped.
    """
