"""Masks stay one byte per voxel (issue 13 item 5): the segmentation helpers and steps never
widen a full-resolution mask to int16/float/int64, and labelmaps are uint8."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines import get_step
from pipelines.steps._masks import Grid, dilate, erode, fill_holes_2d, refine, to_labelmap_image
from pipelines.testing import chest_ct


@pytest.fixture(scope="module")
def phantom():
    return chest_ct(n_slices=40)


def test_morphology_keeps_masks_one_byte_per_voxel(phantom):
    mask = phantom.body.copy()
    assert mask.dtype == np.bool_
    for out in (erode(mask, (0, 2, 2)), dilate(mask, (0, 2, 2)), fill_holes_2d(mask)):
        assert out.itemsize == 1 and out.dtype in (np.bool_, np.uint8), out.dtype
        assert out.shape == mask.shape


def test_refine_and_labelmap_image_are_uint8(phantom):
    image = phantom.volume.image
    a = sitk.GetArrayViewFromImage(image)
    grid = Grid.for_image(image, 3.0)
    coarse = grid.block_max(a) > -500
    labels = refine(grid, coarse.astype(np.uint8), a, lambda sub: sub > -500)
    assert labels.dtype == np.uint8 and labels.shape == a.shape
    lm = to_labelmap_image(labels, image)
    assert lm.GetPixelID() == sitk.sitkUInt8
    assert lm.GetSize() == image.GetSize()


@pytest.mark.parametrize("name", ["segment.body", "segment.lungs", "segment.bone"])
def test_segmentation_labelmaps_are_uint8_on_the_source_grid(phantom, name):
    step = get_step(name)
    (lm,) = step(phantom.volume, step.validate({}))
    assert lm.image.GetPixelID() == sitk.sitkUInt8
    assert lm.image.GetSize() == phantom.volume.image.GetSize()
    # one byte per voxel: the labelmap costs half the int16 volume, never more
    assert lm.image.GetNumberOfComponentsPerPixel() == 1
    assert sitk.GetArrayViewFromImage(lm.image).itemsize == 1
