"""A small analytic chest phantom (HU, LPS) for the segmentation, mesh and projection tests.

Body ellipse, two lung ellipsoids, a trachea that splits into two main bronchi, a spine and a
dense table below the body (separated by air). Ground-truth masks come with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipelines import Volume


@dataclass
class Phantom:
    volume: Volume
    body: np.ndarray  # (z, y, x) bool ground truth
    lungs: np.ndarray  # 0 / 1 right / 2 left
    trachea: np.ndarray
    bone: np.ndarray
    table: np.ndarray


def chest(
    n_slices: int = 60,
    size: int = 192,
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0),
    lungs_touch_ends: bool = False,
    with_lungs: bool = True,
    with_bone: bool = True,
    direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
    seed: int = 0,
) -> Phantom:
    """The phantom on a grid with the given (x, y, z) spacing; slice 0 is the most inferior."""
    sx, sy, sz = spacing
    z, y, x = np.meshgrid(
        (np.arange(n_slices) - (n_slices - 1) / 2) * sz,
        (np.arange(size) - (size - 1) / 2) * sy,
        (np.arange(size) - (size - 1) / 2) * sx,
        indexing="ij",
    )
    half_len = n_slices * sz / 2
    body = (x / 140) ** 2 + (y / 100) ** 2 <= 1
    hu = np.full(x.shape, -1000, np.int16)
    hu[body] = 40
    lungs = np.zeros(x.shape, np.uint8)
    trachea = np.zeros(x.shape, bool)
    if with_lungs:
        zc, zr = (0.0, half_len * 1.3) if lungs_touch_ends else (-10.0, half_len * 0.7)
        for label, xc in ((1, -60.0), (2, 60.0)):  # LPS: right lung at -x
            m = ((x - xc) / 45) ** 2 + ((y + 5) / 65) ** 2 + ((z - zc) / zr) ** 2 <= 1
            lungs[m] = label
        hu[lungs > 0] = -850
        if not lungs_touch_ends:
            # Trachea from the top down to the carina, then main bronchi towards each lung.
            carina = zc + zr * 0.35
            trachea = (x**2 + (y + 20) ** 2 <= 9**2) & (z >= carina)
            for xc in (-1.0, 1.0):
                t = np.clip((carina - z) / 20.0, 0, 1)  # 0 at carina -> 1 twenty mm lower
                bx = xc * 40 * t
                trachea |= (
                    ((x - bx) ** 2 + (y + 20) ** 2 <= 6**2) & (z <= carina) & (z >= carina - 20)
                )
            trachea &= lungs == 0
            hu[trachea] = -1000
    bone = np.zeros(x.shape, bool)
    if with_bone:
        bone = (x**2 + (y - 70) ** 2 <= 14**2) & body  # vertebral column
        hu[bone] = 700
    table = (np.abs(y - 112) <= 3) & (np.abs(x) <= 160)
    hu[table] = 400  # denser than the bone threshold: must still not count as bone
    rng = np.random.default_rng(seed)
    hu = (hu + rng.normal(0, 15, hu.shape)).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    d = np.array(direction, float).reshape(3, 3)
    image.SetDirection(direction)
    centre = np.array([(size - 1) / 2 * sx, (size - 1) / 2 * sy, (n_slices - 1) / 2 * sz])
    image.SetOrigin(tuple(-(d @ centre) + np.array([10.0, -20.0, 100.0])))
    return Phantom(Volume(image, "CT", "phantom"), body, lungs, trachea, bone, table)
