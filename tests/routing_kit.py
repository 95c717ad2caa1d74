"""Test studies for routing: real series from ../shared/data rewritten into one study.

Besides classic series it makes the enhanced (multi-frame) volumes the shared data lacks: an
Enhanced MR of one stack (the magnitude frames of a real Philips B0 map) and a Legacy Converted
Enhanced CT of real Philips CT slices (highdicom's converter).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom import Dataset
from pydicom.uid import generate_uid

DATA = Path("/work/shared/data")
CT = DATA / "ct-abdomen-tcia" / "series"
MR_3D = DATA / "mr-brain-oblique-ge"
HEAD_CT = DATA / "ct-head-tilted-ge"
B0_MAP = DATA / "edge-cases" / "enhanced-mr" / "In" / "Philips" / "IM_0027_fMAP.dcm"
ONE_MR_IMAGE = DATA / "edge-cases" / "transfer-syntaxes"
PREFIX = "1.2.826.0.1.3680043.8.498."


def images(folder: Path) -> list[Dataset]:
    """Every image of a folder (recursively), by InstanceNumber."""
    out = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p)
        except pydicom.errors.InvalidDicomError:
            continue
        if "PixelData" in ds:
            out.append(ds)
    return sorted(out, key=lambda d: int(d.get("InstanceNumber") or 0))


def enhanced_mr_one_stack() -> Dataset:
    """The 32 magnitude frames of a real Philips Enhanced MR B0 map (which also holds 32
    field-map frames at the same positions): one 3D stack in one file."""
    ds = pydicom.dcmread(B0_MAP)
    keep = [
        i for i, f in enumerate(ds.PerFrameFunctionalGroupsSequence)
        if f.MRImageFrameTypeSequence[0].FrameType[3] == "M"
    ]  # fmt: skip
    frame_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
    ds.PixelData = b"".join(ds.PixelData[i * frame_bytes : (i + 1) * frame_bytes] for i in keep)
    ds.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[i] for i in keep]
    ds.NumberOfFrames = len(keep)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "T1", "M"]
    ds.SeriesDescription = "T1 3D (magnitude)"
    return ds


def enhanced_ct(n: int = 30) -> Dataset:
    """A Legacy Converted Enhanced CT: ``n`` real Philips CT slices in one multi-frame object."""
    slices = images(CT)[:n]
    return hd.legacy.LegacyConvertedEnhancedCTImage(slices, generate_uid(), 1, generate_uid(), 1)


def write_study(
    series: Sequence[Sequence[Dataset]], out: Path, tag: str
) -> tuple[str, list[list[Path]]]:
    """Write each list of datasets as one series of a new study (new UIDs, one patient)."""
    study = generate_uid(PREFIX, entropy_srcs=[tag, "study"])
    paths: list[list[Path]] = []
    for k, members in enumerate(series):
        uid = generate_uid(PREFIX, entropy_srcs=[tag, "series", str(k)])
        folder = out / f"s{k:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths.append([])
        for i, ds in enumerate(members):
            ds = pydicom.Dataset(ds)  # shallow copy: the caller's datasets stay as they are
            ds.file_meta = pydicom.dataset.FileMetaDataset(members[i].file_meta)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
            ds.SOPInstanceUID = generate_uid(PREFIX, entropy_srcs=[tag, str(k), str(i)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID, ds.PatientName = f"ROUTE-{tag}"[:64], "Routing^Test"
            ds.AccessionNumber = f"ACC{tag}"[:16]
            ds.SeriesNumber = 201 + k
            p = folder / f"{i:04d}.dcm"
            ds.save_as(p, enforce_file_format=True)
            paths[-1].append(p)
    return study, paths
