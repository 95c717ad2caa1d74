"""Encapsulated STL Storage (PS3.3 A.85): a surface mesh in the source study and frame of reference.

Vertices are in the patient coordinate system (LPS, mm) of the source FrameOfReferenceUID, so a
viewer or planning tool can overlay the model on the images. ``export_mesh`` writes plain
``.stl`` / ``.obj`` files for 3D printing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.uid import UID

from pipelines import Mesh
from workers.reading.source import SourceSeries
from workers.writers.base import Provenance, WrittenObject, writer
from workers.writers.common import (
    code_item,
    contributing_equipment,
    copy_frame_of_reference,
    copy_patient_study,
    derived_series_number,
    dicom_now,
    file_meta,
    referenced_series_item,
    series_description,
    series_folder,
    set_general_equipment,
)
from workers.writers.sanitize import unique

ENCAPSULATED_STL_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.3")
_STL_DTYPE = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])


def stl_bytes(mesh: Mesh, title: str = "sprim") -> bytes:
    """Binary STL of ``mesh`` (coordinates as given: LPS mm), outward normals from the winding."""
    tri = np.asarray(mesh.vertices, dtype=np.float32)[np.asarray(mesh.faces)]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.divide(normals, length, out=np.zeros_like(normals), where=length > 0)
    records = np.zeros(len(tri), dtype=_STL_DTYPE)
    records["normal"] = normals
    records["vertices"] = tri
    header = title.encode("ascii", "replace")[:80].ljust(80, b" ")
    if header.lower().startswith(b"solid"):  # would make readers take it for ASCII STL
        header = b"_" + header[:79]
    return header + np.uint32(len(tri)).tobytes() + records.tobytes()


def export_mesh(mesh: Mesh, path: Path | str) -> Path:
    """Write ``mesh`` as binary ``.stl`` or Wavefront ``.obj`` (by suffix), for 3D printing."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".stl":
        path.write_bytes(stl_bytes(mesh, f"sprim {mesh.description} LPS mm"))
    elif suffix == ".obj":
        v = np.asarray(mesh.vertices, dtype=np.float64)
        f = np.asarray(mesh.faces, dtype=np.int64) + 1  # OBJ indices start at 1
        with path.open("w") as out:
            out.write(f"# sprim {mesh.description}: patient coordinates LPS, mm\n")
            np.savetxt(out, v, fmt="v %.4f %.4f %.4f")
            np.savetxt(out, f, fmt="f %d %d %d")
    else:
        raise ValueError(f"unknown mesh format {suffix!r}: use .stl or .obj")
    return path


def encapsulated_stl(
    mesh: Mesh, source: SourceSeries, prov: Provenance
) -> tuple[Dataset, int, str, tuple[str, ...]]:
    """The Encapsulated STL dataset of ``mesh`` (its SeriesNumber, SeriesDescription, notes)."""
    src = source.first
    notes: list[str] = []
    uids = prov.uids(source)
    sop_uid = uids.instance_uid(0)
    number = derived_series_number(src, prov)
    description = series_description(f"STL {mesh.description}", src, prov.description_suffix)
    ds = Dataset()
    ds.file_meta = file_meta(ENCAPSULATED_STL_STORAGE, sop_uid)
    ds.SOPClassUID = ENCAPSULATED_STL_STORAGE
    ds.SOPInstanceUID = sop_uid
    copy_patient_study(src, ds, notes)
    copy_frame_of_reference(source, ds, notes)  # vertices are in the source's patient coordinates
    # Encapsulated Document Series / Manufacturing 3D Model Series.
    ds.Modality = "M3D"
    ds.SeriesInstanceUID = uids.series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    # Enhanced General Equipment (type 1 for this IOD).
    set_general_equipment(ds)
    ds.DeviceSerialNumber = "SPRIM"
    ds.ContributingEquipmentSequence = contributing_equipment(prov, source, notes)
    # Encapsulated Document module.
    date, time = dicom_now()
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = date + time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = f"{mesh.description} surface (LPS mm)"[:64]
    seg = mesh.segment
    ds.ConceptNameCodeSequence = (
        [code_item(seg.type.value, seg.type.scheme, seg.type.meaning)] if seg else []
    )
    ds.MIMETypeOfEncapsulatedDocument = "model/stl"
    document = stl_bytes(mesh, f"sprim {prov.step.name} {mesh.description}")
    ds.EncapsulatedDocument = document  # 84 + 50 n bytes: always even
    ds.EncapsulatedDocumentLength = len(document)
    # Manufacturing 3D Model module: coordinates in millimetres.
    ds.MeasurementUnitsCodeSequence = [code_item("mm", "UCUM", "millimeter")]
    # SOP Common: the source images the model was derived from.
    refs = []
    for h in source.headers:
        item = Dataset()
        item.ReferencedSOPClassUID = h.SOPClassUID
        item.ReferencedSOPInstanceUID = h.SOPInstanceUID
        refs.append(item)
    ds.SourceInstanceSequence = refs
    # Common Instance Reference module: the referenced instances grouped by series.
    ds.ReferencedSeriesSequence = [referenced_series_item(source.headers)]
    return ds, number, description, unique(notes)


@writer("mesh")
def write_mesh(
    output: Mesh, source: SourceSeries, prov: Provenance, out_dir: Path
) -> list[WrittenObject]:
    """Write a Mesh as one Encapsulated STL instance in its own series."""
    ds, number, description, notes = encapsulated_stl(output, source, prov)
    path = series_folder(out_dir, number, description) / "STL0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [
        WrittenObject(
            path,
            "stl",
            ENCAPSULATED_STL_STORAGE,
            ds.SOPInstanceUID,
            ds.SeriesInstanceUID,
            number,
            description,
            notes,
        )
    ]
