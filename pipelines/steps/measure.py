"""Measurements of labelmap segments: volume (voxel counting) and, on CT, density in HU.

The segments are those of a labelmap produced earlier in the job (its SEG is then referenced by
the report) or, for the built-in names, made by running their segmentation step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from pipelines.registry import step
from pipelines.steps.mesh import labelmap_for
from pipelines.types import (
    HOUNSFIELD_UNIT,
    MILLILITER,
    Code,
    Measurement,
    Measurements,
    Output,
    Volume,
)

VOLUME = Code("118565006", "SCT", "Volume")
#: CID 7474: the volume is the count of segmented voxels times the voxel volume.
VOXEL_COUNTING = Code("126030", "DCM", "Sum of segmented voxel method for volume")
ATTENUATION = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
STANDARD_DEVIATION = Code("386136009", "SCT", "Standard Deviation")


class StatsParams(BaseModel, frozen=True, extra="forbid"):
    segment: str = Field(
        "lungs",
        min_length=1,
        max_length=64,
        description="Segment name: body, bone, lungs (each lung), right lung, left lung, or any "
        "segment name of a labelmap produced earlier in the job.",
    )


@step("measure.segment_stats", version="1.0.0", params=StatsParams, produces="measurements")
def segment_stats(
    volume: Volume, params: StatsParams, prior: Sequence[Output] = ()
) -> Measurements:
    """Volume (mL) of each segment and, on CT, its mean and standard deviation in HU."""
    labelmap, segments = labelmap_for(volume, params.segment, prior)
    labels = sitk.GetArrayViewFromImage(labelmap.image)
    voxel_ml = float(np.prod(labelmap.image.GetSpacing())) / 1000.0
    hu = sitk.GetArrayViewFromImage(volume.image) if volume.modality == "CT" else None
    out: list[Measurement] = []
    for seg in segments:
        mask = labels == seg.label
        n = int(np.count_nonzero(mask))
        if n == 0:
            continue
        out.append(
            Measurement(VOLUME, round(n * voxel_ml, 3), MILLILITER, seg, method=VOXEL_COUNTING)
        )
        if hu is not None and hu.shape == labels.shape:
            inside = hu[mask].astype(np.float64)
            for stat, value in ((MEAN, inside.mean()), (STANDARD_DEVIATION, inside.std())):
                out.append(
                    Measurement(
                        ATTENUATION, round(float(value), 1), HOUNSFIELD_UNIT, seg, derivation=stat
                    )
                )
    names = ", ".join(s.name for s in segments)
    return Measurements(f"Stats {names}", out)
