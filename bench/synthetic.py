"""Reproducible synthetic CT series: a chest phantom written as classic CT Image Storage files.

The phantom is :class:`pipelines.testing.ChestSlices` (shipped with sprim for step authors).

Anatomy (HU): air -1000 outside, a body ellipse of soft tissue (~30 ± noise), two lungs
(~-850) that shrink towards their ends, a vertebral body and spinal canal, rib arcs every
30 mm, and a patient table (+200 HU, 10 mm of air below the body). Stored values are 12-bit
unsigned with RescaleIntercept -1024, the usual CT encoding.

``lungs_touch_ends=True`` makes the lungs run through the first and last slice: 3D hole filling
then silently fails unless one pads a slice at each end, a trap worth a test.

Files are written from one template dataset: each slice serialises only its small header with
pydicom and appends the raw pixel element, so 400 x 512² slices take well under a second plus
disk time.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from pipelines.testing import ChestSlices

INTERCEPT = -1024


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=["sprim-synthetic-ct", str(seed), *map(str, parts)])


def _template(seed: int, n_slices: int, size: int, spacing: tuple[float, float, float]) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.PatientName = "SYNTHETIC^CT"
    ds.PatientID = f"SYNTH{seed:04d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = _uid(seed, n_slices, size, spacing, "study")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = f"SYN{seed}"
    ds.StudyDescription = "SYNTHETIC CHEST"
    ds.Modality = "CT"
    ds.SeriesInstanceUID = _uid(seed, n_slices, size, spacing, "series")
    ds.SeriesNumber = 2
    ds.SeriesDescription = f"SYNTH CHEST {spacing[2]:g}mm"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = _uid(seed, n_slices, size, spacing, "for")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "sprim synthetic"
    ds.ManufacturerModelName = "bench.synthetic"
    ds.InstitutionName = "sprim"
    ds.StationName = "SYNTH"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[0]:g}"]  # row spacing, column spacing
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = f"{spacing[2]:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def write_synthetic_ct(
    out_dir: Path,
    n_slices: int = 400,
    size: int = 512,
    seed: int = 0,
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.0),
    lungs_touch_ends: bool = False,
) -> list[Path]:
    """Write a synthetic chest CT series; return the file paths (InstanceNumber order).

    Parameters
    ----------
    out_dir : Path
        Created if missing; files are ``CT0001.dcm``... (InstanceNumber 1 is the most
        superior slice, so file order runs head to feet like most scanners).
    n_slices, size : int
        Number of axial slices and their Rows = Columns.
    seed : int
        Seeds the noise and the UIDs: the same arguments give byte-identical files.
    spacing : tuple of float
        (column spacing, row spacing, slice spacing) in mm.
    lungs_touch_ends : bool
        Lungs present in the first and last slice (the hole-filling trap).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sx, sy, sz = spacing
    x0, y0 = -(size - 1) / 2 * sx, -(size - 1) / 2 * sy
    x, y = np.meshgrid(x0 + sx * np.arange(size), y0 + sy * np.arange(size))
    # Scale the phantom to the field of view: fixed anatomy of ~360 mm wide needs FOV >= 460 mm.
    fov_scale = max(1.0, 460.0 / (size * max(sx, sy)))
    x, y = x * fov_scale, y * fov_scale
    pad = 64
    noise = rng.normal(0.0, 10.0, size=(4, size + pad, size + pad)).astype(np.int16)
    shifts = rng.integers(0, pad, size=(n_slices, 2))
    z_top = (n_slices - 1) * sz / 2
    phantom = ChestSlices(x, y, (-z_top, z_top), lungs_touch_ends)
    template = _template(seed, n_slices, size, spacing)
    pixel_head = b"\xe0\x7f\x10\x00OW\x00\x00" + (size * size * 2).to_bytes(4, "little")
    paths = []
    stored = np.empty((size, size), dtype="<u2")
    for k in range(n_slices):
        z = z_top - k * sz
        hu = phantom.slice(z)
        dy, dx = shifts[k]
        hu += noise[k % 4, dy : dy + size, dx : dx + size]
        np.maximum(hu, np.int16(INTERCEPT), out=hu)  # stored values are unsigned
        np.subtract(hu, np.int16(INTERCEPT), out=stored, casting="unsafe")
        ds = template
        ds.SOPInstanceUID = _uid(seed, n_slices, size, spacing, "instance", k)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.4f}"]
        ds.SliceLocation = f"{z:.4f}"
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        path = out_dir / f"CT{k + 1:04d}.dcm"
        with open(path, "wb") as fp:
            fp.write(buf.getvalue())
            fp.write(pixel_head)
            fp.write(stored.tobytes())
        paths.append(path)
    return paths


if __name__ == "__main__":  # python -m bench.synthetic OUT_DIR [N_SLICES]
    import sys
    import time

    t0 = time.perf_counter()
    files = write_synthetic_ct(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 400)
    print(f"{len(files)} files in {time.perf_counter() - t0:.2f} s -> {sys.argv[1]}")
