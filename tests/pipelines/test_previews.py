"""Previews: windows map HU as DICOM says, key images from the right slices, segments coloured
where the mask is, meshes drawn where they are in the patient, a cine as its frames."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines import ImageSeries, Labelmap, Mesh, Volume
from pipelines import previews as pv
from pipelines.steps.segment import LEFT_LUNG, RIGHT_LUNG
from pipelines.testing import HU_LUNG, HU_SOFT_TISSUE, chest_ct, run_step


def series(a: np.ndarray, spacing=(1.0, 1.0, 1.0), plane="axial", **kw) -> ImageSeries:
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(spacing)
    return ImageSeries("TEST", image=img, plane=plane, **kw)


def test_window_is_the_dicom_linear_voi_function() -> None:
    w = pv.SOFT_TISSUE  # W400 L40: [-160, 240) spans the grey levels
    out = w.apply(np.array([-1000, -160.5, 40, 239.5, 3000]))
    assert out.tolist() == [0, 0, 128, 255, 255]
    # Linear in between: 100 HU is 0.65 of the way up.
    assert w.apply(np.array([100.0]))[0] == round((100 - (40 - 0.5 - 399 / 2)) * 255 / 399)


@pytest.mark.parametrize(
    ("body_part", "kind", "expected"),
    [
        ("CHEST", "", [pv.LUNG, pv.SOFT_TISSUE]),
        ("chest abdomen", "", [pv.LUNG, pv.SOFT_TISSUE]),
        ("CHEST_ABDOMEN", "", [pv.LUNG, pv.SOFT_TISSUE]),
        ("HEAD", "", [pv.BRAIN]),
        ("ABDOMEN", "", [pv.SOFT_TISSUE]),
        ("", "", [pv.SOFT_TISSUE]),
        ("ABDOMEN", "Bone 1.0 B70f", [pv.BONE]),
        ("ABDOMEN", "Lungs", [pv.LUNG, pv.SOFT_TISSUE]),
        ("HEAD", "Bone", [pv.BONE]),
    ],
)
def test_ct_presets_by_body_part_and_series_kind(body_part, kind, expected) -> None:
    assert pv.ct_windows(body_part, kind) == expected


def test_chest_key_images_in_lung_and_soft_tissue_windows() -> None:
    a = np.full((10, 40, 80), HU_SOFT_TISSUE, np.int16)
    a[:, :, :40] = HU_LUNG  # left half of every image: lung
    (frame,) = pv.key_images(series(a), "CT", "CHEST").frames
    tile = pv.KEY_IMAGE_PX // 2, pv.KEY_IMAGE_PX  # 40 x 80 mm at square pixels
    assert frame.shape == (2 * tile[0] + pv.GAP, 3 * tile[1] + 2 * pv.GAP, 3)
    lung_row, soft_row = frame[: tile[0]], frame[tile[0] + pv.GAP :]
    for row, window in ((lung_row, pv.LUNG), (soft_row, pv.SOFT_TISSUE)):
        for i in range(3):
            x0 = i * (tile[1] + pv.GAP)
            left = row[10:-10, x0 + 10 : x0 + 80]
            right = row[10:-10, x0 + 110 : x0 + 180]
            assert (left == window.apply(np.array([HU_LUNG]))[0]).all()
            assert (right == window.apply(np.array([HU_SOFT_TISSUE]))[0]).all()
    assert (soft_row[10:-10, 10:80] == 0).all()  # lung is black in a soft tissue window


def test_key_images_are_square_pixelled_and_taken_through_the_stack() -> None:
    a = np.repeat(np.arange(20, dtype=np.float32)[:, None, None] * 100, 40, axis=1)
    a = np.repeat(a, 80, axis=2)  # slice k is uniformly k * 100 (MR, arbitrary units)
    p = pv.key_images(series(a, spacing=(1.0, 2.0, 3.0)), "MR")  # rows 2 mm: 80 x 80 mm
    (frame,) = p.frames
    assert frame.shape == (pv.KEY_IMAGE_PX, 3 * pv.KEY_IMAGE_PX + 2 * pv.GAP, 3)
    window = pv.percentile_window(a)
    assert (window.center, window.width) == (950.5, 1901)  # 1st percentile 0, 99th 1900
    means = [frame[:, i * (pv.KEY_IMAGE_PX + pv.GAP) + 5, 0].mean() for i in range(3)]
    assert means == [window.apply(np.array([k * 100.0]))[0] for k in (5, 10, 15)]
    assert "25/50/75 %" in p.caption and "1-99 %" in p.caption


def lung_labelmap():
    ph = chest_ct()
    img = sitk.GetImageFromArray(ph.lungs)
    img.CopyInformation(ph.volume.image)
    return ph, Labelmap("Lungs", img, (RIGHT_LUNG, LEFT_LUNG))


def test_segments_are_coloured_where_the_mask_is() -> None:
    from scipy import ndimage

    ph, lm = lung_labelmap()
    p = pv.overlay(lm, ph.volume, "CHEST")
    (frame,) = p.frames
    levels = pv.segment_levels(ph.lungs)
    present = np.flatnonzero(ph.lungs.any(axis=(1, 2)))
    assert len(levels) == 3 and all(present[0] <= k <= present[-1] for k in levels)
    assert "lung W1500 L-600" in p.caption and "Right lung red, Left lung blue" in p.caption
    n = ph.lungs.shape[1]  # 192 x 192 source pixels of 1.5 mm: tiles of 192 x 192
    assert frame.shape == (n, 3 * n + 2 * pv.GAP, 3)
    for i, k in enumerate(levels):
        tile = frame[:, i * (n + pv.GAP) : i * (n + pv.GAP) + n].astype(int)
        r, g, b = tile[..., 0], tile[..., 1], tile[..., 2]
        right = ndimage.binary_erosion(ph.lungs[k] == 1, iterations=3)
        left = ndimage.binary_erosion(ph.lungs[k] == 2, iterations=3)
        outside = ~ndimage.binary_dilation(ph.lungs[k] > 0, iterations=3)
        assert right.any() and left.any()
        assert (r[right] > g[right] + 40).all() and (r[right] > b[right] + 40).all()
        assert (b[left] > r[left] + 40).all()
        assert (r[outside] == g[outside]).all() and (g[outside] == b[outside]).all()


def test_an_empty_labelmap_says_so() -> None:
    ph, lm = lung_labelmap()
    empty = sitk.Image(lm.image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(lm.image)
    p = pv.overlay(Labelmap("Lungs", empty, lm.segments), ph.volume, "CHEST")
    assert "no voxel segmented" in p.caption
    assert (p.frames[0][..., 0] == p.frames[0][..., 1]).all()


def box_mesh(lo, hi) -> Mesh:
    """A closed box (12 triangles) between LPS corners ``lo`` and ``hi``."""
    c = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = [t for a, b, c_, d in quads for t in ((a, b, c_), (a, c_, d))]
    return Mesh("3D Box", np.array(c, np.float32), np.array(faces, np.int32))


def frame_volume() -> sitk.Image:
    """A 200 mm cube centred on the LPS origin."""
    img = sitk.Image(101, 101, 101, sitk.sitkInt16)
    img.SetSpacing((2.0, 2.0, 2.0))
    img.SetOrigin((-100.0, -100.0, -100.0))
    return img


RENDERERS = [
    "numpy",
    pytest.param(
        "vtk",
        marks=pytest.mark.skipif(
            not pv.offscreen_opengl(), reason="no off-screen OpenGL (EGL) for VTK here"
        ),
    ),
]


@pytest.mark.parametrize("renderer", RENDERERS)
def test_mesh_is_drawn_where_it_is_in_the_patient(renderer) -> None:
    # A box on the patient's left (+x), anterior (-y) and high (+z) in a 200 mm volume.
    mesh = box_mesh((40, -80, 20), (80, -40, 60))
    (frame,) = pv.mesh_views(mesh, frame_volume(), renderer=renderer).frames
    px = pv.MESH_VIEW_PX
    bg = (np.array(pv.BACKGROUND) * 255).round()
    tiles = [frame[:, i * (px + pv.GAP) : i * (px + pv.GAP) + px] for i in range(3)]
    drawn = [np.abs(t.astype(int) - bg).sum(axis=2) > 30 for t in tiles]
    half = 100 * 1.05  # the frame's half side with the margin

    def expect(col_mm, row_mm):  # (column, row) pixel ranges of an LPS extent on screen
        cols = [(v / half + 1) * px / 2 for v in col_mm]
        rows = [(1 - v / half) * px / 2 for v in row_mm[::-1]]
        return slice(round(cols[0]), round(cols[1])), slice(round(rows[0]), round(rows[1]))

    # From the front: patient's left on the viewer's right, head up.
    cols, rows = expect((40, 80), (20, 60))
    # From the left: anterior on the viewer's left (screen right is posterior, +y).
    lat_cols, lat_rows = expect((-80, -40), (20, 60))
    for mask, (c, r) in ((drawn[0], (cols, rows)), (drawn[1], (lat_cols, lat_rows))):
        inner = mask[r.start + 3 : r.stop - 3, c.start + 3 : c.stop - 3]
        assert inner.all()
        outside = mask.copy()
        outside[r.start - 2 : r.stop + 2, c.start - 2 : c.stop + 2] = False
        assert not outside.any()
    assert drawn[2].sum() > 0.5 * drawn[0].sum()  # the oblique sees it too
    shade = tiles[0][rows.start + 5, cols.start + 5]
    # The face towards the viewer lit, in the default (light blue) mesh colour.
    assert shade[2] > 150 and shade[2] > shade[1] > shade[0]
    assert (renderer == "vtk") == ("VTK" in pv.mesh_views(mesh, renderer=renderer).caption)


@pytest.mark.skipif(not pv.offscreen_opengl(), reason="no off-screen OpenGL (EGL) for VTK here")
def test_vtk_and_numpy_draw_the_same_silhouette() -> None:
    ph, lm = lung_labelmap()
    (mesh,) = run_step("mesh.surface", ph.volume, prior=[lm], segment="lungs")
    masks = []
    for renderer in ("vtk", "numpy"):
        (frame,) = pv.mesh_views(mesh, ph.volume.image, renderer=renderer).frames
        masks.append(np.abs(frame.astype(int) - np.array(pv.BACKGROUND) * 255).sum(axis=2) > 30)
    iou = (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum()
    assert iou > 0.9


def test_rotating_mip_is_an_animation_of_every_view() -> None:
    vol: Volume = chest_ct(n_slices=30, size=96, spacing=(3.0, 3.0, 4.0)).volume
    (mip,) = run_step("projection.rotating_mip", vol, views=24, cine_rate=8)
    p = pv.preview(mip, vol, "CHEST")
    assert p.animated and len(p.frames) == 24 and p.frame_seconds == pytest.approx(1 / 8)
    a = sitk.GetArrayViewFromImage(mip.image)
    sx, sy = mip.image.GetSpacing()[:2]
    h, w = a.shape[1] * sy, a.shape[2] * sx  # mm: frames keep the view's aspect
    assert abs(p.frames[0].shape[0] / p.frames[0].shape[1] - h / w) < 0.03
    assert max(p.frames[0].shape[:2]) == pv.CINE_PX
    assert not np.array_equal(p.frames[0], p.frames[6])  # a quarter turn later: another view
    (many,) = run_step("projection.rotating_mip", vol, views=120, cine_rate=30)
    p = pv.preview(many, vol, "CHEST")
    assert len(p.frames) == pv.MAX_CINE_FRAMES and p.frame_seconds == pytest.approx(2 / 30)


def test_preview_dispatches_on_the_kind_of_output() -> None:
    ph, lm = lung_labelmap()
    (ax,) = run_step("reformat.mpr", ph.volume, planes=["axial"])
    assert "axial stack" in pv.preview(ax, ph.volume, "CHEST").caption
    assert "over source slices" in pv.preview(lm, ph.volume, "CHEST").caption
    assert pv.preview(box_mesh((0, 0, 0), (9, 9, 9)), ph.volume).frames[0].dtype == np.uint8


@pytest.mark.parametrize(
    ("body_part", "segment", "expected"),
    [
        ("CHEST", "Right lung Left lung", pv.LUNG),
        ("CHEST", "Body", pv.SOFT_TISSUE),
        ("ABDOMEN", "Bone", pv.BONE),
        ("HEAD", "Brain", pv.BRAIN),
    ],
)
def test_segments_are_shown_on_the_window_of_their_tissue(body_part, segment, expected) -> None:
    assert pv.overlay_window("CT", np.zeros((2, 2, 2)), body_part, segment) == expected


def test_resampling_averages_when_shrinking_and_interpolates_when_growing() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(90, 120)).astype(np.float32)
    small = pv._resize(a, (30, 40))  # each output pixel: the mean of a 3 x 3 block
    assert np.allclose(small, a.reshape(30, 3, 40, 3).mean(axis=(1, 3)), atol=1e-4)
    ramp = np.arange(4, dtype=np.float32)[None, :].repeat(2, axis=0)
    assert pv._resize(ramp, (2, 8))[0].tolist() == [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3]
    labels = np.array([[0, 1], [2, 3]], np.uint8)
    assert pv._resize(labels, (4, 4), order=0).tolist() == [[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2


def test_clustering_keeps_the_surface_and_drops_sub_pixel_triangles() -> None:
    from skimage.measure import marching_cubes

    z, y, x = np.mgrid[-40:41, -40:41, -40:41]
    verts, faces, _, _ = marching_cubes((x**2 + y**2 + z**2 < 30**2).astype(np.float32), 0.5)
    v, f = pv.cluster(verts.astype(float), faces.astype(np.int64), 3.0)
    assert len(f) < len(faces) / 4
    r = np.linalg.norm(v - 40, axis=1)
    assert np.abs(r - 30).max() < 3.0  # merged vertices stay on the sphere, within a cell
    assert (f[:, 0] != f[:, 1]).all() and (f[:, 1] != f[:, 2]).all() and (f[:, 0] != f[:, 2]).all()
    assert len(np.unique(np.sort(f, axis=1), axis=0)) == len(f)
