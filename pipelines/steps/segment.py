"""CT segmentations without learned weights: body, lungs, bone.

Each step decides the region on a coarse grid (about ``coarse_mm`` voxels, where 3D morphology
and connected components are cheap) and refines its boundary at full resolution with the HU
threshold (see :mod:`pipelines.steps._masks`). Output labelmaps are uint8 on the source grid.
"""

from __future__ import annotations

import weakref

import numpy as np
import SimpleITK as sitk
from pydantic import BaseModel, Field

from pipelines.registry import step
from pipelines.steps._masks import (
    Grid,
    components,
    dilate,
    erode,
    fill_holes_2d,
    refine,
    require_ct,
    to_labelmap_image,
)
from pipelines.types import Code, Labelmap, Segment, StepError, Volume

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
TISSUE = Code("85756007", "SCT", "Tissue")
BODY = Segment(1, "Body", ANATOMICAL_STRUCTURE, Code("38266002", "SCT", "Entire body"))
LUNG = Segment(1, "Lung", ANATOMICAL_STRUCTURE, Code("39607008", "SCT", "Lung"))
RIGHT_LUNG = Segment(1, "Right lung", ANATOMICAL_STRUCTURE, Code("3341006", "SCT", "Right lung"))
LEFT_LUNG = Segment(2, "Left lung", ANATOMICAL_STRUCTURE, Code("44029006", "SCT", "Left lung"))
BONE = Segment(1, "Bone", TISSUE, Code("272673000", "SCT", "Bone"))
#: Bounds of HU thresholds: air to the top of the extended 12-bit CT scale.
HU_MIN, HU_MAX = -1024.0, 4095.0


class BodyParams(BaseModel, frozen=True, extra="forbid"):
    threshold_hu: float = Field(
        -500.0,
        ge=HU_MIN,
        le=HU_MAX,
        description="Voxels above this (HU) are patient (or table, clothing, air excluded).",
    )
    opening_mm: float = Field(
        6.0,
        ge=0.0,
        le=50.0,
        description="In-plane opening radius (mm) that detaches table, cushions and clothing.",
    )
    keep_fraction: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Also keep separate parts (arms) at least this fraction of the largest part.",
    )
    coarse_mm: float = Field(
        3.0, ge=0.5, le=20.0, description="Voxel size (mm) of the working grid, 0.5-20."
    )


class LungParams(BaseModel, frozen=True, extra="forbid"):
    threshold_hu: float = Field(
        -400.0, ge=HU_MIN, le=HU_MAX, description="Lung parenchyma and airways are below (HU)."
    )
    min_volume_ml: float = Field(
        50.0,
        ge=0.0,
        le=10000.0,
        description="Air regions smaller than this (mL) are not lung (bowel gas).",
    )
    min_fraction: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="An air region is lung only if at least this fraction of the largest one.",
    )
    airway_max_area_mm2: float = Field(
        700.0,
        gt=0.0,
        le=10000.0,
        description="Largest axial cross-section (mm²) traced as trachea or main bronchus.",
    )
    midline_mm: float = Field(
        30.0,
        gt=0.0,
        le=300.0,
        description="The trachea is sought within this distance (mm) of the midline.",
    )
    coarse_mm: float = Field(
        3.0, ge=0.5, le=20.0, description="Voxel size (mm) of the working grid, 0.5-20."
    )


class BoneParams(BaseModel, frozen=True, extra="forbid"):
    lower_hu: float = Field(
        300.0,
        ge=HU_MIN,
        le=HU_MAX,
        description="Bone voxels are at or above this (HU), if connected to a core (core_hu).",
    )
    core_hu: float = Field(
        600.0,
        ge=HU_MIN,
        le=HU_MAX,
        description="A bright region is bone only if it holds voxels at or above this (HU): "
        "cortex reaches it, contrast-filled vessels and heart chambers do not.",
    )
    min_component_ml: float = Field(
        0.5,
        ge=0.0,
        le=1000.0,
        description="Drop bright specks smaller than this (mL, calcifications, noise).",
    )
    coarse_mm: float = Field(
        3.0, ge=0.5, le=20.0, description="Voxel size (mm) of the working grid."
    )


#: Block max and coarse body of a volume, per grid and parameters: the body, lungs and bone
#: steps of one series compute them once (read-only arrays, dropped with the volume).
_SHARED: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}


def shared_body(
    volume: Volume, a: np.ndarray, grid: Grid, p: BodyParams
) -> tuple[np.ndarray, np.ndarray]:
    """``(block max, coarse body)`` of ``volume`` on ``grid`` (see :func:`body_coarse`)."""
    memo = _SHARED.get(id(volume))
    if memo is None:
        memo = _SHARED[id(volume)] = {}
        weakref.finalize(volume, _SHARED.pop, id(volume), None)  # before the id can be reused
    key = f"{grid.shape}{grid.factors}{p.model_dump_json()}"
    if key not in memo:
        top = grid.block_max(a)
        body = body_coarse(top, grid, volume.image, p)
        top.flags.writeable = body.flags.writeable = False
        memo[key] = (top, body)
    return memo[key]


def body_coarse(top: np.ndarray, grid: Grid, image: sitk.Image, p: BodyParams) -> np.ndarray:
    """The patient on the coarse grid (bool) from the block max ``top``; holes filled per slice.

    Block max, not a subsample: a chest wall thinner than a block must still close the slice.
    StepError when nothing is above the threshold.
    """
    mask = top > p.threshold_hu
    sx, sy, _ = image.GetSpacing()
    _, fy, fx = grid.factors
    r = (0, round(p.opening_mm / (sy * fy)), round(p.opening_mm / (sx * fx)))
    opened = dilate(erode(mask, r), r) if (r[1] or r[2]) else mask  # box opening: separable
    labels, sizes = components(opened)
    if sizes.max(initial=0) == 0:
        raise StepError(f"no patient found above {p.threshold_hu:g} HU")
    keep = sizes >= max(1, p.keep_fraction * sizes.max())
    # The opening also cuts thin chest walls; take the unopened mask back near the kept parts
    # (the table lies farther away) so the slice-wise fill still closes over the lungs.
    kept = keep[labels]
    near, _ = components(mask & dilate(kept, (0, r[1] + 1, r[2] + 1)))
    # ...but only the parts connected to the kept patient: a table across an air gap stays out.
    hit = np.zeros(int(near.max()) + 1, bool)
    hit[np.unique(near[kept])] = True
    hit[0] = False
    return fill_holes_2d(hit[near])


@step("segment.body", version="1.0.0", params=BodyParams, produces="labelmap")
def segment_body(volume: Volume, params: BodyParams) -> Labelmap:
    """Patient outline without table, cushions and clothing (threshold + opening + fill)."""
    a = require_ct(volume, "segment.body")
    grid = Grid.for_image(volume.image, params.coarse_mm)
    _, coarse = shared_body(volume, a, grid, params)
    thr = params.threshold_hu
    labels = refine(grid, coarse.astype(np.uint8), a, lambda sub: sub > thr)
    return Labelmap("Body", to_labelmap_image(labels, volume.image), (BODY,))


def _slice_order_top_down(image: sitk.Image, n: int) -> range:
    """Slice indices from head to feet (LPS +z is superior)."""
    return range(n - 1, -1, -1) if image.GetDirection()[8] >= 0 else range(n)


def _trace_airway(
    air: np.ndarray, image: sitk.Image, grid: Grid, body: np.ndarray, p: LungParams
) -> np.ndarray:
    """Trachea and main bronchi on the coarse grid (bool), traced from the top slice down.

    The trachea is a small air blob near the body midline in the highest slices of the air
    region; it is followed down while its cross-sections stay small, which stops each branch
    where it merges with lung parenchyma in the axial plane. Empty when no trachea is in view.
    """
    from scipy import ndimage

    sx, sy, _ = image.GetSpacing()
    _, fy, fx = grid.factors
    px_mm2 = sx * fx * sy * fy
    max_px = p.airway_max_area_mm2 / px_mm2
    airway = np.zeros_like(air)
    order = [z for z in _slice_order_top_down(image, air.shape[0]) if air[z].any()]
    prev: np.ndarray | None = None
    for n_seen, z in enumerate(order):
        lab, n = ndimage.label(air[z])
        areas = np.bincount(lab.ravel(), minlength=n + 1)
        if prev is None:
            if n_seen >= 5:  # no trachea in the first slices: none in view (lung bases only)
                break
            cols = np.nonzero(body[z].any(axis=0))[0]
            mid_x = (cols[0] + cols[-1]) / 2.0
            for k in range(1, n + 1):
                ys, xs = np.nonzero(lab == k)
                if areas[k] <= max_px and abs(xs.mean() - mid_x) * sx * fx <= p.midline_mm:
                    airway[z] |= lab == k
            prev = airway[z] if airway[z].any() else None
            continue
        hit = np.unique(lab[dilate(prev[None], (0, 1, 1))[0] & (lab > 0)])
        keep = [k for k in hit if areas[k] <= max_px]
        if not keep:
            break
        airway[z] = np.isin(lab, keep)
        prev = airway[z]
    return airway


def _split_left_right(lung: np.ndarray, image: sitk.Image) -> np.ndarray | None:
    """Labels 1 (right) / 2 (left) for a coarse lung mask, or None when they cannot be separated.

    Erodes until the two largest parts are of comparable size (the anterior and posterior
    junction lines give way first), then grows them back inside the mask.
    """
    from scipy import ndimage

    core, n_eroded = lung, 0
    while True:
        labels, sizes = components(core)
        top = np.argsort(sizes)[::-1][:2]
        if len(top) == 2 and sizes[top[1]] >= 0.2 * sizes[top[0]]:
            break
        if n_eroded == 4:
            return None
        core, n_eroded = erode(core, (1, 1, 1)), n_eroded + 1
    # LPS +x points to the patient's left; index x follows +x when direction[0] > 0.
    xs = [np.nonzero(labels == k)[2].mean() for k in top]
    left_first = (xs[0] - xs[1]) * (1.0 if image.GetDirection()[0] >= 0 else -1.0) > 0
    seeds = np.zeros(lung.shape, dtype=np.uint8)
    seeds[labels == top[0]] = 2 if left_first else 1
    seeds[labels == top[1]] = 1 if left_first else 2
    for _ in range(n_eroded + 2):  # geodesic growth back into the eroded rim
        grown = ndimage.maximum_filter(seeds, size=3)
        free = (seeds == 0) & lung
        seeds[free] = grown[free]
    # Voxels still unreached (small detached parts) go by side of the two seeds' midline.
    rest = lung & (seeds == 0)
    if rest.any():
        mid = (xs[0] + xs[1]) / 2.0
        x = np.nonzero(rest)[2]
        side_left = ((x - mid) * (xs[0] - xs[1]) > 0) == left_first
        seeds[rest] = np.where(side_left, 2, 1)
    return seeds


@step("segment.lungs", version="1.0.0", params=LungParams, produces="labelmap")
def segment_lungs(volume: Volume, params: LungParams) -> Labelmap:
    """Right and left lungs (one "Lung" segment when they touch), trachea and main bronchi excluded."""
    a = require_ct(volume, "segment.lungs")
    image = volume.image
    grid = Grid.for_image(image, params.coarse_mm)
    _, body = shared_body(volume, a, grid, BodyParams(coarse_mm=params.coarse_mm))
    air = (grid.subsample(a) < params.threshold_hu) & body
    # Keep the slice-wise enclosed air only: air touching the body outline is outside air.
    air &= erode(body, (0, 1, 1))
    labels, sizes = components(air)
    min_vox = max(params.min_volume_ml / grid.voxel_ml(image), params.min_fraction * sizes.max())
    region = (sizes >= max(min_vox, 1))[labels]
    if not region.any():
        raise StepError(
            f"no lungs found: no air region below {params.threshold_hu:g} HU inside the body "
            f"of at least {params.min_volume_ml:g} mL"
        )
    airway = _trace_airway(region, image, grid, body, params)
    if airway.any():
        airway = dilate(airway, (0, 1, 1))
        region &= ~airway
        labels, sizes = components(region)
        region = (sizes >= max(params.min_volume_ml / grid.voxel_ml(image), 1))[labels]
        if not region.any():
            raise StepError("no lungs found: the air inside the body is trachea/bronchi only")
    split = _split_left_right(region, image)
    segments: tuple[Segment, ...]
    if split is None:
        coarse, segments = fill_holes_2d(region).astype(np.uint8), (LUNG,)
    else:
        coarse = np.zeros(region.shape, dtype=np.uint8)
        for lab in (1, 2):
            coarse[fill_holes_2d(split == lab) & (coarse == 0)] = lab
        segments = (RIGHT_LUNG, LEFT_LUNG)
    if airway.any():
        coarse[airway & (coarse == 0)] = 3  # airway as a label: its band is not given to lung
    thr = params.threshold_hu
    labels_full = refine(grid, coarse, a, lambda sub: sub < thr)
    if airway.any():
        labels_full[labels_full == 3] = 0
    return Labelmap("Lungs", to_labelmap_image(labels_full, image), segments)


@step("segment.bone", version="1.1.0", params=BoneParams, produces="labelmap")
def segment_bone(volume: Volume, params: BoneParams) -> Labelmap:
    """Bone by HU hysteresis inside the patient: regions >= lower_hu holding cortex >= core_hu.

    Contrast-enhanced blood (aorta, heart chambers, 150-450 HU) passes a single 300 HU threshold;
    it is told apart from bone by connectivity at full resolution: a region at or above
    ``lower_hu`` is kept only if it reaches ``core_hu`` somewhere (cortex does, diluted contrast
    does not). Undiluted contrast at the injection site (superior vena cava, subclavian vein)
    can be as dense as cortex and is then kept.
    """
    from scipy import ndimage

    a = require_ct(volume, "segment.bone")
    image = volume.image
    grid = Grid.for_image(image, params.coarse_mm)
    # block max: keeps thin cortex and ribs that a subsample would miss
    top, body = shared_body(volume, a, grid, BodyParams(coarse_mm=params.coarse_mm))
    bright = (top >= params.lower_hu) & dilate(body, (1, 1, 1))
    labels, sizes = components(bright)
    min_vox = params.min_component_ml / grid.voxel_ml(image)
    keep = sizes >= max(min_vox, 1)
    keep[0] = False
    kept = keep[labels]
    box = grid.box(kept)
    mask = np.zeros(grid.shape, np.uint8)  # zero pages outside the box cost no memory
    if box is not None:
        cs, fs = box
        sub = a[fs]
        fine = grid.upsample(kept[cs], sub.shape).view(bool)
        fine &= sub >= params.lower_hu
        # Hysteresis: full-resolution components, kept when they hold a core voxel. At coarse
        # resolution the aorta merges with the vertebra it lies on.
        flabels, n = ndimage.label(fine)
        cored = np.zeros(n + 1, np.uint8)
        cored[flabels[fine & (sub >= params.core_hu)]] = 1
        cored[0] = 0
        del fine
        mask[fs] = cored[flabels]
    if not mask.any():
        raise StepError(
            f"no bone found at or above {params.lower_hu:g} HU inside the patient "
            f"(with cortex at or above {params.core_hu:g} HU)"
        )
    return Labelmap("Bone", to_labelmap_image(mask, image), (BONE,))
