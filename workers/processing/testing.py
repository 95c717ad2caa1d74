"""The step author's kit: run steps on a phantom or a DICOM folder, write DICOM, validate it.

The same path as production: the source is read by ``workers.reading`` (a phantom is first
written as a classic CT or MR series), the steps run through :func:`~workers.processing.runner.
run_steps` (params validated, ``prior`` passed on, buffer estimate checked) and their outputs are
written by the real writers (derived series, SEG + SR, SR of measurements, Encapsulated STL).
Every written file is then checked:

- ``dciodvfy`` (dicom3tools) against its IOD, when installed: its ``Error`` lines fail the check;
  when it is not installed the check is skipped and :attr:`KitResult.notes` says so;
- read back: SEG by highdicom (segments, voxels placed back on the source grid in patient
  coordinates and compared with the labelmap), SR by highdicom (every numeric measurement with its
  unit), STL (triangle count against the mesh), image series by pydicom (pixels decode).

::

    from pipelines.testing import chest_ct
    from workers.processing.testing import run_and_write

    result = run_and_write(chest_ct().volume, ["segment.lungs"], tmp_path)
    result.assert_valid()
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from pipelines import Labelmap, Mesh, Output, Step, Volume, get_step
from workers.core.plugins import load_plugins
from workers.processing.runner import OutputFailure, RunReport, StepCall, run_steps
from workers.reading.series import read_series, scan
from workers.reading.source import SourceSeries
from workers.writers import WrittenObject

log = logging.getLogger(__name__)

#: What the kit says when dciodvfy is not on PATH.
NO_DCIODVFY = (
    "dciodvfy not installed (dicom3tools; Debian: apt-get install dicom3tools): the written "
    "files were read back but not validated against their IODs"
)
#: DCM 112039 "Tracking Identifier": the name of a TID 1500 measurement group.
TRACKING_IDENTIFIER = "112039"
#: Rule name recorded in the outputs' provenance.
KIT_RULE = "sprim-kit"

StepSpec = str | tuple[str, dict[str, Any]]


def dciodvfy() -> str | None:
    """Path of the dciodvfy validator, None when it is not installed."""
    return shutil.which("dciodvfy")


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's ``Error`` lines for one file ([] = valid). FileNotFoundError when not installed."""
    exe = dciodvfy()
    if exe is None:
        raise FileNotFoundError(NO_DCIODVFY)
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]


# --- source series -----------------------------------------------------------------------------

_SOP_CLASS = {"CT": CTImageStorage, "MR": MRImageStorage}
_BODY_PART = {"CT": "CHEST", "MR": "HEAD"}


def _uid(seed: str, *parts: object) -> UID:
    return generate_uid(entropy_srcs=["sprim-kit", seed, *map(str, parts)])


def _voxels_int16(volume: Volume) -> np.ndarray:
    a = sitk.GetArrayViewFromImage(volume.image)
    if a.dtype == np.int16:
        return a
    if np.issubdtype(a.dtype, np.integer) and a.size and -32768 <= a.min() and a.max() <= 32767:
        return a.astype(np.int16)
    raise ValueError(
        f"write_source_series stores int16 pixels; the volume is {a.dtype} "
        "(cast it: sitk.Cast(image, sitk.sitkInt16))"
    )


def write_source_series(
    volume: Volume,
    folder: Path,
    *,
    patient_id: str = "PHANTOM",
    body_part: str | None = None,
) -> list[Path]:
    """Write ``volume`` as a classic single-frame CT or MR Image Storage series; return the files.

    Geometry follows the image: each slice's ImagePositionPatient is its first voxel's LPS
    position, ImageOrientationPatient the first two direction columns (oblique grids stay
    oblique). Pixels are int16 as is (CT: rescale 1/0, so stored value = HU). UIDs derive from
    the voxels and geometry: the same volume always gives the same series.
    """
    modality = volume.modality.upper()
    if modality not in _SOP_CLASS:
        raise ValueError(f"write_source_series writes CT or MR series, not {volume.modality!r}")
    image = volume.image
    if image.GetDimension() != 3:
        raise ValueError("write_source_series needs a 3D volume")
    arr = _voxels_int16(volume)
    seed = hashlib.sha1(arr.tobytes()).hexdigest() + repr(
        (image.GetOrigin(), image.GetSpacing(), image.GetDirection(), modality)
    )
    sx, sy, sz = image.GetSpacing()
    d = np.array(image.GetDirection()).reshape(3, 3)
    iop = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.PatientName = f"PHANTOM^{modality}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid(seed, "study")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "PHANTOM"
    ds.StudyDescription = f"PHANTOM {modality}"
    ds.Modality = modality
    ds.SeriesInstanceUID = _uid(seed, "series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = (volume.series_description or f"PHANTOM {modality}")[:64]
    ds.BodyPartExamined = body_part or _BODY_PART[modality]
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = _uid(seed, "frame")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "sprim kit"
    ds.ManufacturerModelName = "workers.processing.testing"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]  # row spacing, column spacing
    ds.ImageOrientationPatient = iop
    ds.SliceThickness = f"{sz:.6g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if modality == "CT":
        ds.KVP = "120"
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
    else:  # MR Image module: a T1 spin echo
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "500", "10", "1"
        ds.MagneticFieldStrength = "1.5"
        ds.ImagedNucleus = "1H"
        ds.SpacingBetweenSlices = f"{sz:.6g}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(arr.shape[0]):
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = _uid(seed, "instance", k)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [
            f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))
        ]
        ds.PixelData = np.ascontiguousarray(arr[k]).tobytes()
        path = folder / f"{modality}{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_source(source: Volume | Path | SourceSeries, work_dir: Path) -> SourceSeries:
    """A source series: ``source`` itself, the one series of a DICOM folder (or .zip), or a
    phantom written under ``work_dir/source`` and read back."""
    if isinstance(source, SourceSeries):
        return source
    if isinstance(source, Volume):
        folder = Path(work_dir) / "source"
        write_source_series(source, folder)
        source = folder
    found = scan([Path(source)])
    if len(found) != 1:
        names = ", ".join(s.name for s in found) or "none"
        raise ValueError(
            f"{source}: the kit needs exactly one series, found {len(found)} ({names})"
        )
    return read_series(found[0])


# --- read-back ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredValue:
    """A numeric item read back from an SR: concept meaning, value and UCUM unit; its group's
    tracking identifier (the segment name, or the output's description) and the segment it
    references (SEG SOPInstanceUID, segment number), None when the group references none."""

    name: str
    value: float
    unit: str
    group: str = ""
    segment: tuple[str, int] | None = None


@dataclass
class FileCheck:
    """The validation of one written file.

    ``dciodvfy`` is None when dciodvfy is not installed, else its ``Error`` lines; ``problems``
    are read-back findings (an unreadable object, voxels or triangles not matching the step's
    output); ``segments`` (SEG: label -> voxels read back), ``measurements`` (SR) and
    ``triangles`` (STL) are what the file holds.
    """

    written: WrittenObject
    dciodvfy: list[str] | None = None
    problems: list[str] = field(default_factory=list)
    segments: dict[str, int] = field(default_factory=dict)
    measurements: list[MeasuredValue] = field(default_factory=list)
    triangles: int = 0

    @property
    def errors(self) -> list[str]:
        where = f"{self.written.kind} {self.written.path.parent.name}/{self.written.path.name}"
        return [f"{where}: {e}" for e in (self.dciodvfy or []) + self.problems]


@dataclass
class KitResult:
    """What :func:`run_and_write` did: the source, each step's outputs, the files and their checks.

    ``checks`` covers every SEG, SR and STL and the first, middle and last image of each series.
    """

    source: SourceSeries
    out_dir: Path
    report: RunReport
    outputs: dict[str, list[Output]]
    checks: list[FileCheck]
    notes: list[str] = field(default_factory=list)

    @property
    def written(self) -> list[WrittenObject]:
        return self.report.written

    @property
    def failures(self) -> list[OutputFailure]:
        return self.report.failures

    def files(self, kind: str) -> list[WrittenObject]:
        """The files written of one kind (``series``, ``seg``, ``sr`` or ``stl``): path, UIDs,
        SeriesNumber and SeriesDescription of each."""
        return [w for w in self.written if w.kind == kind]

    def check(self, kind: str) -> FileCheck:
        """The one check of a kind (AssertionError when there is not exactly one)."""
        found = [c for c in self.checks if c.written.kind == kind]
        assert len(found) == 1, f"{len(found)} {kind} files written, expected 1"
        return found[0]

    def measurements(self, name: str | None = None) -> list[MeasuredValue]:
        """The numeric measurements read back from every SR written (those of concept ``name``,
        e.g. "Volume", when given)."""
        found = [m for c in self.checks for m in c.measurements]
        return [m for m in found if name is None or m.name == name]

    @property
    def errors(self) -> list[str]:
        """Failed steps and outputs, dciodvfy errors and read-back problems ([] = all good)."""
        return [f"failed: {f}" for f in self.failures] + [e for c in self.checks for e in c.errors]

    def assert_valid(self) -> None:
        """AssertionError listing every error, when there is one."""
        assert not self.errors, "\n".join(self.errors)


def _sr_numbers(ds: Dataset) -> list[MeasuredValue]:
    """Every NUM content item, with the tracking identifier and referenced segment of its group."""
    out: list[MeasuredValue] = []

    def concept(item: Dataset) -> str:
        seq = item.get("ConceptNameCodeSequence")
        return str(seq[0].CodeValue) if seq else ""

    def walk(item: Dataset, group: str, segment: tuple[str, int] | None) -> None:
        children = list(getattr(item, "ContentSequence", []))
        for child in children:  # a group's identifier and references come with its numbers
            if child.ValueType == "TEXT" and concept(child) == TRACKING_IDENTIFIER:
                group = str(child.TextValue)
            ref = child.get("ReferencedSOPSequence")
            if child.ValueType == "IMAGE" and ref and "ReferencedSegmentNumber" in ref[0]:
                segment = (
                    str(ref[0].ReferencedSOPInstanceUID),
                    int(ref[0].ReferencedSegmentNumber),
                )
        for child in children:
            if child.ValueType == "NUM" and "MeasuredValueSequence" in child:
                mv = child.MeasuredValueSequence[0]
                out.append(
                    MeasuredValue(
                        str(child.ConceptNameCodeSequence[0].CodeMeaning),
                        float(mv.NumericValue),
                        str(mv.MeasurementUnitsCodeSequence[0].CodeValue),
                        group,
                        segment,
                    )
                )
            walk(child, group, segment)

    walk(ds, "", None)
    return out


def _check_seg(check: FileCheck, labelmap: Labelmap | None) -> None:
    import highdicom as hd

    seg = hd.seg.segread(check.written.path)
    vol = seg.get_volume(combine_segments=True, relabel=False)
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    a = np.asarray(vol.array)
    check.segments = {labels[n]: int(np.count_nonzero(a == n)) for n in numbers}
    if labelmap is None:
        return
    # Back onto the labelmap's grid through patient coordinates: the first voxel of the SEG
    # volume must land on a labelmap voxel, its axes on the labelmap's.
    expected = sitk.GetArrayViewFromImage(labelmap.image)
    img = labelmap.image
    affine = np.asarray(vol.affine)
    origin = affine[:3, 3]
    idx = np.array(img.TransformPhysicalPointToContinuousIndex([float(v) for v in origin]))
    if np.abs(idx - idx.round()).max() > 1e-2:
        check.problems.append(f"SEG frames are off the source grid (first voxel at index {idx})")
        return
    # highdicom volumes index (slice, row, column); the labelmap array (z, y, x). The SEG may
    # run along an axis the other way (slices head first): flip it onto the labelmap's order.
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    steps = np.linalg.solve(d, affine[:3, :3])  # labelmap index step (x, y, z) per SEG axis
    signs = np.array([steps[2, 0], steps[1, 1], steps[0, 2]])
    if not np.allclose(np.abs(steps), np.fliplr(np.eye(3)), atol=1e-3):
        check.problems.append("SEG volume axes are not the source grid's")
        return
    for axis in np.flatnonzero(signs < 0):
        a = np.flip(a, int(axis))
        idx = idx + (a.shape[axis] - 1) * steps[:, axis]
    k, j, i = (int(round(v)) for v in idx[::-1])
    if min(k, j, i) < 0 or any(
        o + n > m for o, n, m in zip((k, j, i), a.shape, expected.shape, strict=True)
    ):
        check.problems.append("the SEG reaches outside the source grid")
        return
    want = expected[k : k + a.shape[0], j : j + a.shape[1], i : i + a.shape[2]]
    lut = np.zeros(256, np.uint8)
    for n, s in enumerate(labelmap.segments, start=1):
        lut[s.label] = n
    if want.shape != a.shape or not np.array_equal(lut[want], a):
        check.problems.append("SEG voxels differ from the labelmap the step returned")
    outside = np.count_nonzero(expected) - np.count_nonzero(want)
    if outside:
        check.problems.append(f"{outside} labelmap voxels are missing from the SEG")


def _check_sr(check: FileCheck) -> None:
    import highdicom as hd

    hd.sr.srread(check.written.path)  # parses as a highdicom SR
    check.measurements = _sr_numbers(pydicom.dcmread(check.written.path))
    if not check.measurements:
        check.problems.append("the SR holds no numeric measurement")


def _check_stl(check: FileCheck, mesh: Mesh | None) -> None:
    ds = pydicom.dcmread(check.written.path)
    doc = bytes(ds.EncapsulatedDocument)
    n = int.from_bytes(doc[80:84], "little") if len(doc) >= 84 else -1
    check.triangles = n
    if len(doc) not in (84 + 50 * n, 84 + 50 * n + 1):  # +1: padded to an even length
        check.problems.append(f"STL of {len(doc)} bytes does not hold {n} triangles")
    elif mesh is not None and n != len(mesh.faces):
        check.problems.append(f"STL has {n} triangles, the mesh {len(mesh.faces)}")


def _check_series(check: FileCheck) -> None:
    ds = pydicom.dcmread(check.written.path)
    if ds.pixel_array.shape[-2:] != (ds.Rows, ds.Columns):
        check.problems.append("pixel data does not decode to Rows x Columns")


def check_file(written: WrittenObject, made_from: Output | None = None) -> FileCheck:
    """Validate one written file (dciodvfy when installed, then a read-back of its kind)."""
    check = FileCheck(written)
    if dciodvfy() is not None:
        check.dciodvfy = dciodvfy_errors(written.path)
    try:
        if written.kind == "seg":
            _check_seg(check, made_from if isinstance(made_from, Labelmap) else None)
        elif written.kind == "sr":
            _check_sr(check)
        elif written.kind == "stl":
            _check_stl(check, made_from if isinstance(made_from, Mesh) else None)
        else:
            _check_series(check)
    except (
        InvalidDicomError,
        OSError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
    ) as e:
        # An object its reader cannot take apart is a finding of the check, not a crash.
        check.problems.append(f"cannot be read back: {type(e).__name__}: {e}")
    return check


# --- run ---------------------------------------------------------------------------------------


def _recording(step: Step, sink: list[Output]) -> Step:
    """``step`` that also appends what it returns to ``sink`` (the runner keeps no outputs)."""

    def fn(volume: Volume, params: Any, prior: Sequence[Output] = ()) -> list[Output]:
        outs = step(volume, params, prior)
        sink.extend(outs)
        return outs

    return dataclasses.replace(step, fn=fn)


def step_calls(steps: StepSpec | Sequence[StepSpec]) -> list[StepCall]:
    """``"name"``, ``("name", {params})`` or a list of them, as validated step calls.

    Steps of the modules named in ``SPRIM_PLUGINS`` are known, as in ``sprim run``.
    """
    load_plugins()
    specs = [steps] if isinstance(steps, str | tuple) else list(steps)
    calls = []
    for spec in specs:
        name, values = (spec, {}) if isinstance(spec, str) else spec
        st = get_step(name)
        calls.append(StepCall(st, st.validate(values)))
    return calls


def _sampled(written: Sequence[WrittenObject]) -> list[WrittenObject]:
    """Every object but the images of a series: its first, middle and last (dciodvfy takes
    about 0.1 s a file)."""
    series: dict[str, list[WrittenObject]] = {}
    for w in written:
        if w.kind == "series":
            series.setdefault(w.series_uid, []).append(w)
    keep = {id(s[k]) for s in series.values() for k in {0, len(s) // 2, len(s) - 1}}
    return [w for w in written if w.kind != "series" or id(w) in keep]


def run_and_write(
    source: Volume | Path | SourceSeries,
    steps: StepSpec | Sequence[StepSpec],
    out_dir: Path,
    *,
    validate: bool = True,
) -> KitResult:
    """Run ``steps`` (in order, as one job) on ``source``; write and validate every output.

    ``source`` is a phantom volume (written as a DICOM series under ``out_dir/source`` first), a
    folder or .zip holding one DICOM series, or a series already read. ``steps``: a step name,
    ``(name, params)``, or a list of them. Outputs go under ``out_dir/outputs``. A step that
    fails does not raise: it is in :attr:`KitResult.failures` (and :attr:`KitResult.errors`),
    its traceback in the log (pytest shows it with the failing test).
    """
    out_dir = Path(out_dir)
    src = read_source(source, out_dir)
    made: dict[str, list[Output]] = {}
    calls = []
    for call in step_calls(steps):
        made[call.step.name] = []
        calls.append(StepCall(_recording(call.step, made[call.step.name]), call.params))
    report = run_steps(src, calls, KIT_RULE, out_dir / "outputs")
    result = KitResult(src, out_dir / "outputs", report, made, [])
    if not validate:
        return result
    if dciodvfy() is None:
        result.notes.append(NO_DCIODVFY)
        log.warning(NO_DCIODVFY)
    for step_report in report.steps:
        # The n-th SEG (STL) of a step comes from its n-th labelmap (mesh), when all were written.
        outs = made.get(step_report.name, [])
        by_kind: dict[str, list[Output]] = {
            "seg": [o for o in outs if isinstance(o, Labelmap)],
            "stl": [o for o in outs if isinstance(o, Mesh)],
        }
        counts = {k: sum(w.kind == k for w in step_report.outputs) for k in by_kind}
        seen = dict.fromkeys(by_kind, 0)
        for w in _sampled(step_report.outputs):
            made_from = None
            if w.kind in by_kind and counts[w.kind] == len(by_kind[w.kind]):
                made_from = by_kind[w.kind][seen[w.kind]]
                seen[w.kind] += 1
            result.checks.append(check_file(w, made_from))
    segs = {w.sop_instance_uid for w in report.written if w.kind == "seg"}
    for c in result.checks:
        for m in c.measurements:
            if m.segment and m.segment[0] not in segs:
                c.problems.append(f"{m.group}: references a SEG this job did not write")
    return result
