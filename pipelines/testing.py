"""Synthetic phantoms and a step runner for step authors' tests: known anatomy, known geometry.

Pure like every ``pipelines`` module: volumes in memory, no DICOM. To write a phantom as a DICOM
series, run a step on it and validate the DICOM it writes, use ``workers.processing.testing``.

- :func:`chest_ct`: a chest CT (HU) with body, right/left lungs, trachea and main bronchi, a spine
  and a table below the patient, with a ground-truth mask of each.
- :func:`head_mr`: a T1-like head MR (arbitrary units): scalp, skull, brain, white matter,
  ventricles, with their masks.
- :class:`ChestSlices`: a larger chest CT evaluated one axial slice at a time (ribs, spinal canal),
  for series too large to hold in memory (the benchmarks write 400 x 512² slices from it).
- :func:`oblique`: direction cosines of a tilted acquisition, for any phantom's ``direction``.
- :func:`run_step`: a registered step by name, params as keywords, outputs as a list.

Every phantom is deterministic: the same arguments give the same voxels (seeded noise). The
anatomy is laid out in the image grid's own frame, so with an oblique ``direction`` the patient
lies tilted in LPS and the masks still match the voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipelines.catalog import get_step
from pipelines.types import Output, Volume

#: Hounsfield units of the chest CT phantom's tissues (before noise).
HU_AIR, HU_LUNG, HU_SOFT_TISSUE, HU_BONE, HU_TABLE = -1000, -850, 40, 700, 400
#: Noise (standard deviation, HU) added to every CT phantom voxel.
CT_NOISE_HU = 15.0
#: T1-like signal (arbitrary units) of the head MR phantom's tissues (before noise).
MR_SCALP, MR_SKULL, MR_GREY, MR_WHITE, MR_CSF = 700, 100, 450, 650, 150
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def oblique(degrees: float, axis: str = "x") -> tuple[float, ...]:
    """Direction cosines (9 floats, SimpleITK order) of a grid rotated ``degrees`` about the
    LPS ``axis`` ("x", "y" or "z"): ``oblique(20)`` tilts the axial slices 20° about left-right,
    like a gantry-aligned or double-oblique acquisition."""
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return tuple(float(v) for v in r.flatten())


def _grid(
    n_slices: int, size: int, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, y, x) mm coordinates of every voxel, centred on the grid's middle."""
    sx, sy, sz = spacing
    return np.meshgrid(
        (np.arange(n_slices) - (n_slices - 1) / 2) * sz,
        (np.arange(size) - (size - 1) / 2) * sy,
        (np.arange(size) - (size - 1) / 2) * sx,
        indexing="ij",
    )


def _image(
    values: np.ndarray,
    spacing: Sequence[float],
    direction: Sequence[float],
    centre_lps: Sequence[float],
) -> sitk.Image:
    """``values`` (z, y, x) as an image whose central voxel sits at ``centre_lps``."""
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in direction))
    d = np.array(direction, float).reshape(3, 3)
    half = (np.array(image.GetSize()) - 1) / 2 * np.array(spacing, float)
    image.SetOrigin(tuple(float(v) for v in np.array(centre_lps, float) - d @ half))
    return image


@dataclass
class ChestPhantom:
    """The chest CT phantom and its ground truth, each mask (z, y, x) on the volume's grid."""

    volume: Volume
    body: np.ndarray  # bool: the patient (table excluded)
    lungs: np.ndarray  # uint8: 0 outside, 1 right lung, 2 left lung
    trachea: np.ndarray  # bool: trachea and main bronchi (air, not lung)
    bone: np.ndarray  # bool: the vertebral column
    table: np.ndarray  # bool: the patient table (denser than the bone threshold)


def chest_ct(
    n_slices: int = 60,
    size: int = 192,
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0),
    direction: Sequence[float] = IDENTITY,
    lungs_touch_ends: bool = False,
    with_lungs: bool = True,
    with_bone: bool = True,
    seed: int = 0,
) -> ChestPhantom:
    """A chest CT phantom (int16 HU, LPS) with its ground-truth masks.

    Parameters
    ----------
    n_slices, size : int
        Slices, and rows = columns of each slice. Slice 0 is the most inferior.
    spacing : tuple of float
        (column, row, slice) spacing in mm; anisotropic grids are fine.
    direction : sequence of 9 floats
        Direction cosines (see :func:`oblique`).
    lungs_touch_ends : bool
        Lungs run through the first and last slice (3D hole filling then fails unless padded).
    with_lungs, with_bone : bool
        Leave the lungs (and trachea) or the spine out, to test a step's refusal.
    seed : int
        Seeds the noise (Gaussian, :data:`CT_NOISE_HU`).

    The body is an ellipse of 280 x 200 mm, each lung an ellipsoid of 90 x 130 mm across
    centred 60 mm right and left of the midline; the centre of the grid is at LPS
    (10, -20, 100) mm.
    """
    z, y, x = _grid(n_slices, size, spacing)
    half_len = n_slices * spacing[2] / 2
    body = (x / 140) ** 2 + (y / 100) ** 2 <= 1
    hu = np.full(x.shape, HU_AIR, np.int16)
    hu[body] = HU_SOFT_TISSUE
    lungs = np.zeros(x.shape, np.uint8)
    trachea = np.zeros(x.shape, bool)
    if with_lungs:
        zc, zr = (0.0, half_len * 1.3) if lungs_touch_ends else (-10.0, half_len * 0.7)
        for label, xc in ((1, -60.0), (2, 60.0)):  # LPS: the right lung is at -x
            lungs[((x - xc) / 45) ** 2 + ((y + 5) / 65) ** 2 + ((z - zc) / zr) ** 2 <= 1] = label
        hu[lungs > 0] = HU_LUNG
        if not lungs_touch_ends:
            # Trachea from the top down to the carina, then a main bronchus towards each lung.
            carina = zc + zr * 0.35
            trachea = (x**2 + (y + 20) ** 2 <= 9**2) & (z >= carina)
            for side in (-1.0, 1.0):
                bx = side * 40 * np.clip((carina - z) / 20.0, 0, 1)
                trachea |= (
                    ((x - bx) ** 2 + (y + 20) ** 2 <= 6**2) & (z <= carina) & (z >= carina - 20)
                )
            trachea &= lungs == 0
            hu[trachea] = HU_AIR
    bone = np.zeros(x.shape, bool)
    if with_bone:
        bone = (x**2 + (y - 70) ** 2 <= 14**2) & body  # vertebral column, posterior
        hu[bone] = HU_BONE
    table = (np.abs(y - 112) <= 3) & (np.abs(x) <= 160)
    hu[table] = HU_TABLE
    rng = np.random.default_rng(seed)
    hu = (hu + rng.normal(0, CT_NOISE_HU, hu.shape)).astype(np.int16)
    image = _image(hu, spacing, direction, (10.0, -20.0, 100.0))
    return ChestPhantom(Volume(image, "CT", "PHANTOM CHEST"), body, lungs, trachea, bone, table)


@dataclass
class HeadPhantom:
    """The head MR phantom and its ground truth, each mask (z, y, x) on the volume's grid."""

    volume: Volume
    head: np.ndarray  # bool: everything inside the scalp
    skull: np.ndarray  # bool
    brain: np.ndarray  # bool: inside the skull (grey and white matter, ventricles)
    white_matter: np.ndarray  # bool
    ventricles: np.ndarray  # bool: the two lateral ventricles (CSF)


def head_mr(
    n_slices: int = 48,
    size: int = 176,
    spacing: tuple[float, float, float] = (1.2, 1.2, 4.0),
    direction: Sequence[float] = IDENTITY,
    seed: int = 0,
) -> HeadPhantom:
    """A T1-weighted-like head MR phantom (int16, arbitrary units) with its ground-truth masks.

    Nested ellipsoids (semi-axes left-right x anterior-posterior x head-feet): head 75 x 95 x 85
    mm, skull 4 mm thick inside the scalp, white matter 50 x 70 x 55 mm, two lateral ventricles
    6 x 20 x 12 mm at 10 mm either side of the midline. Signal: scalp :data:`MR_SCALP`, skull
    :data:`MR_SKULL`, grey :data:`MR_GREY`, white :data:`MR_WHITE`, CSF :data:`MR_CSF`; the noise
    is Rician (magnitude of complex Gaussian noise of sigma 20), so the background is not 0.
    The centre of the grid is at LPS (0, 10, 60) mm. Parameters as for :func:`chest_ct`.
    """
    z, y, x = _grid(n_slices, size, spacing)

    def inside(a: float, b: float, c: float, x0: float = 0.0) -> np.ndarray:
        return ((x - x0) / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1

    head = inside(75, 95, 85)
    outer_skull, brain = inside(71, 91, 81), inside(67, 87, 77)
    skull = outer_skull & ~brain
    white = inside(50, 70, 55)
    ventricles = inside(6, 20, 12, -10.0) | inside(6, 20, 12, 10.0)
    signal = np.zeros(x.shape, np.float32)
    signal[head] = MR_SCALP
    signal[skull] = MR_SKULL
    signal[brain] = MR_GREY
    signal[white] = MR_WHITE
    signal[ventricles] = MR_CSF
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 20.0, (2, *signal.shape)).astype(np.float32)
    mr = np.hypot(signal + noise[0], noise[1]).round().astype(np.int16)
    image = _image(mr, spacing, direction, (0.0, 10.0, 60.0))
    volume = Volume(image, "MR", "PHANTOM HEAD T1")
    return HeadPhantom(volume, head, skull, brain, white & ~ventricles, ventricles)


#: HU of :class:`ChestSlices` (its own values: the benchmarks' series are measured with them).
SLICES_HU_AIR, SLICES_HU_SOFT, SLICES_HU_LUNG = -1000, 30, -850
SLICES_HU_BONE, SLICES_HU_TABLE, SLICES_HU_CSF = 700, 200, 10


class ChestSlices:
    """A chest CT phantom evaluated one axial slice at a time (static parts computed once).

    Air outside, a body ellipse of soft tissue, two lungs that shrink towards their ends, a
    vertebral body and spinal canal, rib arcs every 30 mm and a patient table 10 mm below the
    body. Values are the ``SLICES_HU_*`` constants, without noise.

    Parameters
    ----------
    x, y : np.ndarray
        Patient coordinates (mm, LPS) of every pixel of a slice.
    z_range : tuple of float
        Lowest and highest slice height (mm), for the lung extent.
    lungs_touch_ends : bool
        Lungs present in the first and last slice.
    """

    def __init__(
        self, x: np.ndarray, y: np.ndarray, z_range: tuple[float, float], lungs_touch_ends: bool
    ) -> None:
        x, y = x.astype(np.float32), y.astype(np.float32)
        base = np.full(x.shape, SLICES_HU_AIR, dtype=np.int16)
        base[(x / 170.0) ** 2 + (y / 120.0) ** 2 <= 1.0] = SLICES_HU_SOFT  # body
        base[(np.abs(y - 135.0) <= 2.5) & (np.abs(x) <= 220.0)] = SLICES_HU_TABLE
        canal = x**2 + (y - 97.0) ** 2
        base[(canal > 7.0**2) & (canal <= 12.0**2)] = SLICES_HU_BONE  # posterior arch
        base[canal <= 7.0**2] = SLICES_HU_CSF  # spinal canal
        base[x**2 + (y - 70.0) ** 2 <= 18.0**2] = SLICES_HU_BONE  # vertebral body
        ring = (x / 160.0) ** 2 + (y / 110.0) ** 2
        self.rib = (ring >= 0.86) & (ring <= 0.93) & (np.abs(x) > 25.0)
        self.base = base
        # Normalised lung radii: lung k is where q[k] <= scale(z)^2.
        self.q = [((x - cx) / 60.0) ** 2 + ((y + 5.0) / 85.0) ** 2 for cx in (-75.0, 75.0)]
        self.z_range = z_range
        self.lungs_touch_ends = lungs_touch_ends

    def lung_scale(self, z: float) -> float:
        """Lung cross-section scale at height ``z`` (0 = no lung)."""
        lo, hi = self.z_range
        frac = (z - lo) / (hi - lo) if hi > lo else 0.5
        if self.lungs_touch_ends:
            return 0.85 + 0.15 * float(np.sin(np.pi * frac))
        scale = max(0.0, 1.0 - ((frac - 0.5) / 0.42) ** 2) ** 0.5  # zero before the ends
        return scale if scale > 0.05 else 0.0

    def slice(self, z: float) -> np.ndarray:
        """HU (int16) of the axial slice at height ``z`` (mm)."""
        hu = self.base.copy()
        scale2 = self.lung_scale(z) ** 2
        if scale2:
            for q in self.q:
                hu[(q <= scale2) & (hu == SLICES_HU_SOFT)] = SLICES_HU_LUNG
        if (z - self.z_range[0]) % 30.0 < 10.0:  # ribs every 30 mm
            hu[self.rib] = SLICES_HU_BONE
        return hu


def run_step(
    name: str, volume: Volume, prior: Sequence[Output] = (), **params: object
) -> list[Output]:
    """Run the registered step ``name`` on ``volume`` with ``params`` validated by its model.

    What the runner does before it writes anything: params validated (a pydantic
    ``ValidationError`` names a bad one), ``prior`` passed on, every output's kind checked
    against the step's declared ``produces``. Returns the outputs as a list.
    """
    st = get_step(name)
    return st(volume, st.validate(params), tuple(prior))


__all__ = [
    "CT_NOISE_HU",
    "HU_AIR",
    "HU_BONE",
    "HU_LUNG",
    "HU_SOFT_TISSUE",
    "HU_TABLE",
    "ChestPhantom",
    "ChestSlices",
    "HeadPhantom",
    "chest_ct",
    "head_mr",
    "oblique",
    "run_step",
]
