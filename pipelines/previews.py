"""Previews of step outputs: small RGB pictures a person looks at before opening a viewer.

Pure rendering: outputs (and the source volume) in, RGB uint8 arrays out; ``workers`` encodes
and files them. What each kind of output gets:

- a derived image series: key images (25, 50, 75 % through the stack) in the series' own plane,
  one row per display window — CT presets chosen by body part and series kind (lung and soft
  tissue for a chest, brain for a head, bone for a bone-kernel series, soft tissue otherwise),
  other modalities the 1st–99th percentile of the series;
- a labelmap: the segments in colour over the source at three levels through the segmented
  region, on the window that shows the structure (lung window for lungs, bone for bone);
- a mesh: an off-screen VTK rendering from the front, the left and a front-left-above oblique,
  framed on the source volume so the structure sits where it is in the patient. Where VTK has no
  off-screen OpenGL (EGL) the triangles are rasterised with numpy instead (see :func:`render_mesh`);
- a cine (rotating MIP): every view as one frame of an animation.

Display geometry: images are shown as a DICOM viewer shows the slices (first row at the top,
first column at the left), resampled to square pixels from the pixel spacing.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipelines.types import ImageSeries, Labelmap, Mesh, Output, Volume

RGB = tuple[float, float, float]
#: Longest side (pixels) of one key image, one overlay level, one mesh view, one cine frame.
KEY_IMAGE_PX = 192
MESH_VIEW_PX = 224
CINE_PX = 224
#: Cine frames kept at most (a 360-view MIP plays every other view; the loop time is kept).
MAX_CINE_FRAMES = 60
#: Where the key images and overlay levels are taken, as fractions through the stack/region.
LEVELS = (0.25, 0.5, 0.75)
#: Gap (pixels, black) between the tiles of a montage.
GAP = 2
#: Opacity of a segment's colour over the source image (its outline is drawn opaque).
OVERLAY_ALPHA = 0.4
#: Segment colours by label value (1 = first), distinct on grey: red, blue, green, yellow,
#: magenta, cyan, orange, violet; repeated past 8.
PALETTE = np.array(
    [
        (230, 60, 60),
        (60, 130, 240),
        (60, 200, 90),
        (240, 210, 40),
        (220, 70, 200),
        (40, 210, 210),
        (245, 140, 30),
        (150, 100, 240),
    ],
    np.uint8,
)


@dataclass(frozen=True)
class Window:
    """A linear VOI window (DICOM PS3.3 C.11.2.1.2): ``center`` and ``width`` in stored units
    after rescale (HU for CT)."""

    name: str
    center: float
    width: float

    def apply(self, a: np.ndarray) -> np.ndarray:
        """``a`` mapped to uint8 grey: below the window 0, above it 255, linear in between."""
        lo = self.center - 0.5 - (self.width - 1) / 2
        scale = 255.0 / max(self.width - 1, 1e-6)
        out = (np.asarray(a, np.float32) - np.float32(lo)) * np.float32(scale)
        grey: np.ndarray = np.clip(out, 0, 255).round().astype(np.uint8)
        return grey

    def __str__(self) -> str:
        return f"{self.name} W{self.width:g} L{self.center:g}"


#: CT presets (HU), as radiology workstations ship them.
BRAIN = Window("brain", 40, 80)
LUNG = Window("lung", -600, 1500)
SOFT_TISSUE = Window("soft tissue", 40, 400)
BONE = Window("bone", 400, 1800)
CHEST_PARTS = {"CHEST", "THORAX", "LUNG", "CHEST_ABDOMEN", "CHEST_ABDOMEN_PELVIS", "TAP", "CAP"}
HEAD_PARTS = {"HEAD", "BRAIN", "SKULL", "HEADNECK", "HEAD_NECK"}
_LUNG_WORDS = re.compile(r"(?i)\b(lungs?|pulm\w*|hrct|parenchyma)\b")
_BONE_WORDS = re.compile(r"(?i)\b(bones?|osteo\w*|skelet\w*|spine)\b")


def ct_windows(body_part: str = "", series_kind: str = "") -> list[Window]:
    """The CT windows a radiologist reads this kind of series in, the main one first.

    ``body_part`` is BodyPartExamined; ``series_kind`` is free text naming the series (its
    SeriesDescription, a segment name): a lung- or bone-kernel series, a lung or bone segment
    get that window first.
    """
    part = body_part.strip().upper().replace(" ", "_")
    if _BONE_WORDS.search(series_kind):
        return [BONE]
    if _LUNG_WORDS.search(series_kind):
        return [LUNG, SOFT_TISSUE]
    if part in HEAD_PARTS:
        return [BRAIN]
    if part in CHEST_PARTS:
        return [LUNG, SOFT_TISSUE]
    return [SOFT_TISSUE]


def percentile_window(a: np.ndarray, low: float = 1.0, high: float = 99.0) -> Window:
    """A window spanning the ``low``–``high`` percentiles of ``a`` (MR, PET: no fixed units).

    Computed on at most ~1 M samples (a strided view) so a 500-slice series costs milliseconds.
    """
    flat = np.asarray(a).ravel()
    sample = flat[:: max(1, flat.size // 1_000_000)]
    lo, hi = (float(v) for v in np.percentile(sample, (low, high)))
    if hi <= lo:
        hi = lo + 1.0
    return Window(f"{low:g}-{high:g} %", (lo + hi) / 2 + 0.5, hi - lo + 1)


def windows_for(
    modality: str, data: np.ndarray, body_part: str = "", kind: str = ""
) -> list[Window]:
    """CT presets for CT (see :func:`ct_windows`), percentiles for anything else."""
    if modality.upper() == "CT":
        return ct_windows(body_part, kind)
    return [percentile_window(data)]


@dataclass
class Preview:
    """What to show for one output.

    Attributes
    ----------
    caption : str
        What the picture shows: planes, levels, windows, views ("COR key images 25/50/75 %,
        lung W1500 L-600 | soft tissue W400 L40").
    frames : list of ndarray
        RGB uint8 images (rows, columns, 3); more than one = an animation.
    frame_seconds : float or None
        How long each frame shows (an animation); None for a still.
    """

    caption: str
    frames: list[np.ndarray] = field(default_factory=list)
    frame_seconds: float | None = None

    @property
    def animated(self) -> bool:
        return len(self.frames) > 1


def preview(output: Output, source: Volume, body_part: str = "") -> Preview | None:
    """The preview of one step output (None for a kind of output without a picture).

    ``source`` is the volume the step ran on (labelmaps are drawn over it, meshes framed in
    it); ``body_part`` its BodyPartExamined (chooses CT windows).
    """
    if isinstance(output, ImageSeries):
        if output.cine_rate:
            return cine(output, source.modality, body_part)
        return key_images(output, source.modality, body_part, source.series_description)
    if isinstance(output, Labelmap):
        return overlay(output, source, body_part)
    if isinstance(output, Mesh):
        return mesh_views(output, source.image)
    return None


# -- images -----------------------------------------------------------------------------------


def _display_shape(
    rows: int, cols: int, row_mm: float, col_mm: float, longest: int
) -> tuple[int, int]:
    """(rows, cols) of the displayed tile: square pixels, longest side ``longest`` at most."""
    h, w = rows * row_mm, cols * col_mm
    scale = longest / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize(a: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    """``a`` (2D) resampled to ``shape``: area-averaged where it shrinks (no aliasing),
    linearly interpolated where it grows; nearest neighbour for labels (``order=0``)."""
    out = np.asarray(a, np.float32 if order else a.dtype)
    for axis, n in enumerate(shape):
        out = _resample_axis(out, n, axis, order)
    return out


def _resample_axis(a: np.ndarray, n: int, axis: int, order: int) -> np.ndarray:
    """``a`` resampled to ``n`` samples along ``axis`` (pixel-centred grids, same extent)."""
    m = a.shape[axis]
    if n == m:
        return a
    scale = m / n
    if not order:
        idx = np.minimum(((np.arange(n) + 0.5) * scale).astype(np.intp), m - 1)
        nearest: np.ndarray = np.take(a, idx, axis=axis)
        return nearest
    if scale > 1:
        # Mean over each output pixel's footprint [j, j + 1) * scale: differences of the
        # running sum, read between samples by linear interpolation (exact for box pixels).
        pad = [(1, 0) if k == axis else (0, 0) for k in range(a.ndim)]
        run = np.pad(np.cumsum(a, axis=axis, dtype=np.float64), pad)
        edges = np.arange(n + 1) * scale
        i0 = np.minimum(edges.astype(np.intp), m - 1)
        w = _along(edges - i0, axis, a.ndim)
        at = np.take(run, i0, axis=axis) * (1 - w) + np.take(run, i0 + 1, axis=axis) * w
        mean: np.ndarray = (np.diff(at, axis=axis) / scale).astype(np.float32)
        return mean
    x = np.clip((np.arange(n) + 0.5) * scale - 0.5, 0, m - 1)
    i0 = np.minimum(x.astype(np.intp), m - 2) if m > 1 else np.zeros(n, np.intp)
    w = _along(x - i0, axis, a.ndim) if m > 1 else _along(np.zeros(n), axis, a.ndim)
    hi = np.take(a, np.minimum(i0 + 1, m - 1), axis=axis)
    linear: np.ndarray = (np.take(a, i0, axis=axis) * (1 - w) + hi * w).astype(np.float32)
    return linear


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """``v`` shaped to broadcast along ``axis`` of an ``ndim`` array."""
    return v.reshape([-1 if k == axis else 1 for k in range(ndim)])


def _levels(n: int, fractions: Sequence[float] = LEVELS) -> list[int]:
    return list(dict.fromkeys(min(n - 1, int(f * n)) for f in fractions))


def _slice_mm(image: sitk.Image) -> tuple[float, float]:
    """(row, column) pixel spacing of the slices of ``image`` (slices along its third axis)."""
    sx, sy = image.GetSpacing()[:2]
    return sy, sx


def _grey(tile: np.ndarray) -> np.ndarray:
    return np.repeat(tile[..., None], 3, axis=2)


def montage(rows: Sequence[Sequence[np.ndarray]], fill: RGB = (0.0, 0.0, 0.0)) -> np.ndarray:
    """RGB tiles laid out in rows, ``fill`` (black) between and around them; tiles of a row
    centred vertically."""
    heights = [max(t.shape[0] for t in r) for r in rows]
    widths = [sum(t.shape[1] for t in r) + GAP * (len(r) - 1) for r in rows]
    out = np.zeros((sum(heights) + GAP * (len(rows) - 1), max(widths), 3), np.uint8)
    out[:] = np.round(np.array(fill) * 255).astype(np.uint8)
    y = 0
    for r, h in zip(rows, heights, strict=True):
        x = 0
        for t in r:
            dy = (h - t.shape[0]) // 2
            out[y + dy : y + dy + t.shape[0], x : x + t.shape[1]] = t
            x += t.shape[1] + GAP
        y += h + GAP
    return out


def key_images(
    series: ImageSeries, modality: str, body_part: str = "", series_kind: str = ""
) -> Preview:
    """Key images of a derived series: one row per window, columns at :data:`LEVELS`."""
    a = sitk.GetArrayViewFromImage(series.image)
    if a.ndim == 2:
        a = a[None]
    levels = _levels(a.shape[0])
    windows = windows_for(modality, a, body_part, f"{series_kind} {series.description}")
    shape = _display_shape(a.shape[1], a.shape[2], *_slice_mm(series.image), KEY_IMAGE_PX)
    tiles = [_resize(a[k], shape) for k in levels]
    rows = [[_grey(w.apply(t)) for t in tiles] for w in windows]
    where = "/".join(f"{100 * k // a.shape[0]}" for k in levels)
    caption = (
        f"{series.description}: images {where} % through the {series.plane} stack; "
        + " | ".join(map(str, windows))
    )
    return Preview(caption, [montage(rows)])


def cine(series: ImageSeries, modality: str, body_part: str = "") -> Preview:
    """Every view of a cine series (rotating MIP) as an animation at its cine rate."""
    a = sitk.GetArrayViewFromImage(series.image)
    step = -(-a.shape[0] // MAX_CINE_FRAMES)  # ceil: at most MAX_CINE_FRAMES frames
    # A MIP of CT shows bone and contrast: the bone window; otherwise the series' percentiles.
    window = BONE if modality.upper() == "CT" else percentile_window(a, 1, 99.5)
    shape = _display_shape(a.shape[1], a.shape[2], *_slice_mm(series.image), CINE_PX)
    frames = [_grey(window.apply(_resize(a[k], shape))) for k in range(0, a.shape[0], step)]
    rate = float(series.cine_rate or 10.0)
    caption = f"{series.description}: {len(frames)} frames at {rate / step:g}/s; {window}"
    return Preview(caption, frames, step / rate)


# -- labelmaps --------------------------------------------------------------------------------


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (or on the image border)."""
    p = np.pad(mask, 1)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    edge: np.ndarray = mask & ~inner
    return edge


def overlay_tile(grey: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB of ``grey`` (uint8) with each label > 0 tinted in its :data:`PALETTE` colour and
    outlined in it."""
    rgb = _grey(grey).astype(np.float32)
    for value in np.unique(labels[labels > 0]):
        m = labels == value
        colour = PALETTE[(int(value) - 1) % len(PALETTE)].astype(np.float32)
        rgb[m] = (1 - OVERLAY_ALPHA) * rgb[m] + OVERLAY_ALPHA * colour
        rgb[_outline(m)] = colour
    out: np.ndarray = rgb.round().astype(np.uint8)
    return out


def overlay_window(modality: str, data: np.ndarray, body_part: str, kind: str) -> Window:
    """The window a segment is checked on: lung or bone for those, otherwise the body part's
    window for soft tissue (a body outline on a chest CT: soft tissue, not lung)."""
    windows = windows_for(modality, data, body_part, kind)
    if modality.upper() != "CT" or _LUNG_WORDS.search(kind) or _BONE_WORDS.search(kind):
        return windows[0]
    return next((w for w in windows if w is not LUNG), SOFT_TISSUE)


def segment_levels(labels: np.ndarray) -> list[int]:
    """Slices (first axis of ``labels``) at :data:`LEVELS` through those holding a segment;
    the middle slice when none does."""
    present = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if not len(present):
        return [labels.shape[0] // 2]
    n = len(present)
    return list(dict.fromkeys(int(present[min(n - 1, int(f * n))]) for f in LEVELS))


def overlay(labelmap: Labelmap, source: Volume, body_part: str = "") -> Preview:
    """The segments over the source at three levels through the segmented slices."""
    lab = sitk.GetArrayViewFromImage(labelmap.image)
    src = sitk.GetArrayViewFromImage(source.image)
    if lab.shape != src.shape:
        raise ValueError(f"labelmap {lab.shape} and source {src.shape} grids differ")
    levels = segment_levels(lab)
    names = " ".join(s.name for s in labelmap.segments)
    window = overlay_window(source.modality, src, body_part, f"{names} {labelmap.description}")
    shape = _display_shape(src.shape[1], src.shape[2], *_slice_mm(source.image), KEY_IMAGE_PX)
    tiles = [
        overlay_tile(window.apply(_resize(src[k], shape)), _resize(lab[k], shape, order=0))
        for k in levels
    ]
    colours = ", ".join(f"{s.name} {_colour_name(s.label)}" for s in labelmap.segments)
    where = ", ".join(str(k + 1) for k in levels)
    empty = "" if lab[levels[0]].any() else " (no voxel segmented)"
    caption = f"{labelmap.description}{empty}: {colours} over source slices {where}; {window}"
    return Preview(caption, [montage([tiles])])


_COLOUR_NAMES = ("red", "blue", "green", "yellow", "magenta", "cyan", "orange", "violet")


def _colour_name(label: int) -> str:
    return _COLOUR_NAMES[(label - 1) % len(_COLOUR_NAMES)]


# -- meshes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """An orthographic camera: looks along ``direction`` with ``up`` upwards (LPS vectors)."""

    name: str
    direction: tuple[float, float, float]
    up: tuple[float, float, float]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(right, up, into-screen) unit vectors in LPS."""
        d = np.array(self.direction, float)
        d /= np.linalg.norm(d)
        up = np.array(self.up, float)
        up = up - d * (up @ d)
        up /= np.linalg.norm(up)
        return np.cross(d, up), up, d


#: Front (patient's left on the viewer's right, as radiology shows it), left side, and an
#: oblique from front-left-above. LPS: +x left, +y posterior, +z superior.
MESH_VIEWS = (
    View("anterior", (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    View("left lateral", (-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    View("anterior-left oblique", (-0.6, 0.65, -0.45), (0.0, 0.0, 1.0)),
)


@dataclass(frozen=True)
class Camera:
    """An orthographic picture: ``view`` centred on the LPS point ``centre``, ``mm`` per pixel,
    ``width`` x ``height`` pixels."""

    view: View
    centre: np.ndarray
    mm: float
    width: int
    height: int

    @classmethod
    def framing(cls, view: View, lo: np.ndarray, hi: np.ndarray, px: int) -> Camera:
        """The camera that shows the box ``lo``-``hi`` from ``view`` (5 % margin), its longer
        side ``px`` pixels."""
        right, up, _ = view.axes()
        corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1)
        rel = corners.T - (lo + hi) / 2
        w, h = (float(np.abs(rel @ a).max()) * 2.1 + 1e-3 for a in (right, up))
        mm = max(w, h) / px
        return cls(view, (lo + hi) / 2, mm, max(1, round(w / mm)), max(1, round(h / mm)))

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixel (column, row) floats and depth (mm, into the screen) of LPS ``points``."""
        right, up, d = self.view.axes()
        rel = points - self.centre
        col = rel @ right / self.mm + self.width / 2 - 0.5
        row = self.height / 2 - rel @ up / self.mm - 0.5
        return col, row, rel @ d


_MESH_COLOURS: dict[str, RGB] = {"bone": (0.92, 0.88, 0.78), "lung": (0.95, 0.62, 0.6)}
_MESH_DEFAULT_COLOUR = (0.65, 0.78, 0.95)
BACKGROUND = (0.1, 0.1, 0.12)


def mesh_colour(mesh: Mesh) -> RGB:
    name = f"{mesh.segment.name if mesh.segment else ''} {mesh.description}".lower()
    return next((c for k, c in _MESH_COLOURS.items() if k in name), _MESH_DEFAULT_COLOUR)


def volume_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) LPS corners of the box holding every voxel centre of ``image``."""
    size = np.array(image.GetSize()) - 1
    corners = np.array(np.meshgrid(*[[0, s] for s in size], indexing="ij")).reshape(3, -1).T
    pts = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    return pts.min(axis=0), pts.max(axis=0)


def mesh_views(
    mesh: Mesh,
    frame: sitk.Image | None = None,
    renderer: str = "auto",
    views: Sequence[View] = MESH_VIEWS,
    px: int = MESH_VIEW_PX,
) -> Preview:
    """The mesh from each of ``views``, side by side.

    ``frame``: the source volume; the cameras frame its box, so a lung sits where the lungs are
    in the chest (None: frame the mesh itself). ``renderer``: ``vtk`` (off-screen OpenGL),
    ``numpy`` (the rasteriser) or ``auto`` (VTK when off-screen OpenGL works here).
    """
    verts = np.asarray(mesh.vertices, np.float64)
    faces = np.asarray(mesh.faces, np.int64)
    if frame is not None:
        lo, hi = volume_box(frame)
    elif len(verts):
        lo, hi = verts.min(axis=0), verts.max(axis=0)
    else:
        lo, hi = np.zeros(3), np.ones(3)
    use_vtk = renderer == "vtk" or (renderer == "auto" and offscreen_opengl())
    draw = _render_vtk if use_vtk else _render_numpy
    colour = mesh_colour(mesh)
    cameras = [Camera.framing(v, lo, hi, px) for v in views]
    # Triangles smaller than a pixel cost render time and show nothing: merged first.
    shown_verts, shown_faces = cluster(verts, faces, min(c.mm for c in cameras))
    tiles = draw(shown_verts, shown_faces, cameras, colour)
    how = "VTK off-screen" if use_vtk else "numpy rasteriser"
    caption = (
        f"{mesh.description}: {len(faces)} triangles ({len(shown_faces)} drawn) seen from "
        + ", ".join(v.name for v in views)
        + f" ({how})"
    )
    return Preview(caption, [montage([tiles], BACKGROUND)])


def cluster(verts: np.ndarray, faces: np.ndarray, cell_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex clustering: vertices in one ``cell_mm`` cube merged at their mean, triangles
    that collapse dropped, duplicates kept once. The surface is unchanged at pixel scale."""
    if not len(faces) or cell_mm <= 0:
        return verts, faces
    q = np.floor((verts - verts.min(axis=0)) / cell_mm).astype(np.int64)
    dims = q.max(axis=0) + 1
    key = (q[:, 0] * dims[1] + q[:, 1]) * dims[2] + q[:, 2]
    _, group, counts = np.unique(key, return_inverse=True, return_counts=True)
    merged = (
        np.stack(
            [np.bincount(group, weights=verts[:, k], minlength=len(counts)) for k in range(3)],
            axis=1,
        )
        / counts[:, None]
    )
    f = group[faces]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    # One copy of each triangle (either winding): its sorted corners as one integer key.
    c = np.sort(f, axis=1)
    bits = max(1, int(len(counts)).bit_length())
    _, first = np.unique((c[:, 0] << (2 * bits)) | (c[:, 1] << bits) | c[:, 2], return_index=True)
    return merged, f[np.sort(first)]


@functools.cache
def offscreen_opengl() -> bool:
    """VTK can render off-screen here (EGL; no display needed). Probed once per process:
    rendering where it cannot crashes the process instead of raising. The probe's window is
    the one the renders use (a second OpenGL context would cost as much again)."""
    with _VTK_LOCK:
        try:
            window, _ = _vtk_scene()
        except Exception:  # noqa: BLE001  (no OpenGL module at all: the numpy path)
            return False
        with _vtk_quiet():
            ok = bool(window.SupportsOpenGL())
        if ok:
            window.ReleaseCurrent()
        return ok


class _vtk_quiet:
    """VTK's warnings off while probing (they go to stderr, into `sprim run`'s table)."""

    def __enter__(self) -> None:
        from vtkmodules.vtkCommonCore import vtkLogger, vtkObject

        self.saved = vtkLogger.GetCurrentVerbosityCutoff(), vtkObject.GetGlobalWarningDisplay()
        vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_OFF)
        vtkObject.GlobalWarningDisplayOff()

    def __exit__(self, *exc: object) -> None:
        from vtkmodules.vtkCommonCore import vtkLogger, vtkObject

        vtkLogger.SetStderrVerbosity(self.saved[0])
        vtkObject.SetGlobalWarningDisplay(self.saved[1])


def _vtk_window() -> Any:
    """An off-screen render window: EGL when there is no X display (a plain vtkRenderWindow
    would try X first and log a warning on every process)."""
    if not os.environ.get("DISPLAY"):
        from vtkmodules.vtkRenderingOpenGL2 import vtkEGLRenderWindow

        window: Any = vtkEGLRenderWindow()
    else:
        import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL factories)
        from vtkmodules.vtkRenderingCore import vtkRenderWindow

        window = vtkRenderWindow()
    window.SetOffScreenRendering(1)
    return window


def _render_vtk(
    verts: np.ndarray, faces: np.ndarray, cameras: Sequence[Camera], colour: RGB
) -> list[np.ndarray]:
    """The surface rendered once per camera in the process's off-screen window."""
    with _VTK_LOCK:
        return _render_vtk_locked(verts, faces, cameras, colour)


#: The one off-screen window is used by one thread at a time (jobs may run in threads).
_VTK_LOCK = threading.Lock()


def _render_vtk_locked(
    verts: np.ndarray, faces: np.ndarray, cameras: Sequence[Camera], colour: RGB
) -> list[np.ndarray]:
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401
    from vtkmodules.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray, vtk_to_numpy
    from vtkmodules.vtkCommonCore import vtkPoints
    from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData
    from vtkmodules.vtkRenderingCore import vtkActor, vtkPolyDataMapper, vtkWindowToImageFilter

    window, renderer = _vtk_scene()
    if len(faces):
        points = vtkPoints()
        points.SetData(numpy_to_vtk(np.ascontiguousarray(verts), deep=True))
        cells = vtkCellArray()
        offsets = np.arange(0, 3 * len(faces) + 1, 3, dtype=np.int64)
        cells.SetData(
            numpy_to_vtkIdTypeArray(offsets, deep=True),
            numpy_to_vtkIdTypeArray(np.ascontiguousarray(faces.ravel()), deep=True),
        )
        poly = vtkPolyData()
        poly.SetPoints(points)
        poly.SetPolys(cells)
        # No point normals: VTK's shader shades each triangle by its own normal (flat), which
        # at preview size looks the same and saves computing normals of ~200k triangles.
        mapper = vtkPolyDataMapper()
        mapper.SetInputData(poly)
        actor = vtkActor()
        actor.SetMapper(mapper)
        prop = actor.GetProperty()
        prop.SetColor(*colour)
        prop.SetSpecular(0.2)
        renderer.AddActor(actor)
    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    tiles = []
    try:
        for cam in cameras:
            _, up, d = cam.view.axes()
            window.SetSize(cam.width, cam.height)
            camera.SetFocalPoint(*cam.centre)
            camera.SetPosition(*(cam.centre - d * cam.mm * (cam.width + cam.height) * 2))
            camera.SetViewUp(*up)
            camera.SetParallelScale(cam.mm * cam.height / 2)
            renderer.ResetCameraClippingRange()
            window.Render()
            grab = vtkWindowToImageFilter()
            grab.SetInput(window)
            grab.ReadFrontBufferOff()
            grab.ShouldRerenderOff()  # just rendered
            grab.Update()
            out = grab.GetOutput()
            w, h, _ = out.GetDimensions()
            rgb = vtk_to_numpy(out.GetPointData().GetScalars()).reshape(h, w, -1)
            tiles.append(np.ascontiguousarray(rgb[::-1, :, :3], dtype=np.uint8))
    finally:
        renderer.RemoveAllViewProps()  # the surface's GPU buffers go with it
        window.ReleaseCurrent()  # the next render may come from another thread
    return tiles


@functools.cache
def _vtk_scene() -> tuple[Any, Any]:
    """One off-screen window and renderer per process: a new OpenGL context costs more than
    rendering a 200k-triangle surface three times."""
    from vtkmodules.vtkRenderingCore import vtkRenderer

    window = _vtk_window()
    renderer = vtkRenderer()
    renderer.SetBackground(*BACKGROUND)
    window.AddRenderer(renderer)
    return window, renderer


def _render_numpy(
    verts: np.ndarray, faces: np.ndarray, cameras: Sequence[Camera], colour: RGB
) -> list[np.ndarray]:
    return [_rasterise(verts, faces, cam, colour) for cam in cameras]


def _rasterise(verts: np.ndarray, faces: np.ndarray, cam: Camera, colour: RGB) -> np.ndarray:
    """Orthographic z-buffer rasteriser: each triangle sampled on a barycentric grid fine enough
    to touch every pixel it covers, the nearest sample kept per pixel, flat headlight shading."""
    img = np.empty((cam.height, cam.width, 3), np.uint8)
    img[:] = (np.array(BACKGROUND) * 255).round().astype(np.uint8)
    if not len(faces):
        return img
    col, row, depth = cam.project(verts)
    screen = np.stack([col, row, depth], axis=1)[faces]  # (faces, 3 corners, xyz)
    tri = verts[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(normal, axis=1)
    shade = 0.25 + 0.75 * np.abs(normal @ cam.view.axes()[2]) / np.where(length > 0, length, 1)
    edge = np.max(np.linalg.norm(screen[:, [1, 2, 0], :2] - screen[:, :, :2], axis=2), axis=1)
    n_sub = np.clip(np.ceil(edge * 1.5).astype(int), 1, 256)
    cols, rows, depths, shades = [], [], [], []
    for n in np.unique(n_sub):
        pick = np.flatnonzero(n_sub == n)
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        keep = i + j <= n
        bary = np.stack([n - i[keep] - j[keep], i[keep], j[keep]], axis=1) / n  # (samples, 3)
        pts = np.einsum("sk,fkc->fsc", bary, screen[pick])  # (faces, samples, xyz)
        cols.append(pts[..., 0].ravel())
        rows.append(pts[..., 1].ravel())
        depths.append(pts[..., 2].ravel())
        shades.append(np.repeat(shade[pick], len(bary)))
    c = np.rint(np.concatenate(cols)).astype(np.int64)
    r = np.rint(np.concatenate(rows)).astype(np.int64)
    z = np.concatenate(depths)
    s = np.concatenate(shades)
    inside = (c >= 0) & (c < cam.width) & (r >= 0) & (r < cam.height)
    pixel, z, s = (r * cam.width + c)[inside], z[inside], s[inside]
    order = np.lexsort((z, pixel))  # per pixel, the nearest sample first
    first = np.ones(len(order), bool)
    first[1:] = pixel[order][1:] != pixel[order][:-1]
    nearest = order[first]
    flat = img.reshape(-1, 3)
    flat[pixel[nearest]] = (np.outer(s[nearest], colour) * 255).round().astype(np.uint8)
    return img
