"""SEG + SR (labelmap writer), Encapsulated STL (mesh writer) and the rotating MIP series.

A small synthetic chest CT is written as DICOM, read back with workers.reading.series, segmented, and
every object is checked with dciodvfy and read back with highdicom / numpy-stl.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from pipelines import get_step
from workers.processing.testing import dciodvfy, dciodvfy_errors
from workers.writers import Provenance, write_output
from workers.writers.stl import export_mesh

DCIODVFY = dciodvfy()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from bench.synthetic import write_synthetic_ct
    from workers.reading.series import read_series, scan

    folder = tmp_path_factory.mktemp("ct")
    write_synthetic_ct(folder, n_slices=48, size=160, spacing=(2.5, 2.5, 2.5))
    return read_series(scan([folder])[0])


def run_and_write(source, out: Path, name: str, index: int = 0, prior=(), **params):
    st = get_step(name)
    p = st.validate(params)
    outputs = st(source.volume, p, prior)
    written = []
    for j, o in enumerate(outputs):
        written += write_output(o, source, Provenance("test", st, p, index, j, o.description), out)
    return outputs, written


@pytest.fixture(scope="module")
def lungs(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    (lm,), written = run_and_write(source, out, "segment.lungs")
    return lm, written


def test_labelmap_gives_one_seg_and_one_sr(lungs) -> None:
    _, written = lungs
    assert [w.kind for w in written] == ["seg", "sr"]
    assert len({w.series_uid for w in written}) == 2
    assert len({w.series_number for w in written}) == 2
    assert all("Lungs" in w.series_description for w in written)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed")
def test_seg_and_sr_have_no_dciodvfy_error(lungs) -> None:
    for w in lungs[1]:
        assert dciodvfy_errors(w.path) == [], w.kind


def test_seg_reads_back_voxel_exact(lungs, source) -> None:
    lm, written = lungs
    seg = hd.seg.segread(written[0].path)
    assert seg.SegmentationType == "BINARY"
    assert seg.FrameOfReferenceUID == source.first.FrameOfReferenceUID
    assert seg.StudyInstanceUID == source.study_uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Right lung", "Left lung"]
    desc = seg.SegmentSequence[1]
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "44029006"
    assert desc.SegmentAlgorithmType == "AUTOMATIC"
    algo = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "sprim segment.lungs" and algo.AlgorithmVersion == "1.0.0"
    expected = sitk.GetArrayFromImage(lm.image)
    present = {
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    uids = [h.SOPInstanceUID for h in source.headers]
    assert len(present) < len(uids)  # empty frames omitted (fast path)
    got = np.zeros_like(expected)
    keep = [k for k, u in enumerate(uids) if u in present]
    got[keep] = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[uids[k] for k in keep],
        segment_numbers=[1, 2],
        combine_segments=True,
    )
    assert np.array_equal(got, expected)


def _num_items(item):
    for child in getattr(item, "ContentSequence", []):
        yield child
        yield from _num_items(child)


def test_sr_volumes_match_voxel_counting_and_reference_the_seg(lungs) -> None:
    lm, written = lungs
    seg = pydicom.dcmread(written[0].path)
    sr = pydicom.dcmread(written[1].path)
    assert sr.SOPClassUID == hd.sr.Comprehensive3DSR.from_dataset(sr).SOPClassUID
    items = list(_num_items(sr))
    volumes = [
        float(i.MeasuredValueSequence[0].NumericValue)
        for i in items
        if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "118565006"
    ]
    units = {
        i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
        for i in items
        if i.ValueType == "NUM"
    }
    refs = [
        (
            i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
            i.ReferencedSOPSequence[0].ReferencedSegmentNumber,
        )
        for i in items
        if i.ValueType == "IMAGE" and "ReferencedSegmentNumber" in i.ReferencedSOPSequence[0]
    ]
    labels = sitk.GetArrayFromImage(lm.image)
    voxel_ml = float(np.prod(lm.image.GetSpacing())) / 1000.0
    counted = [np.count_nonzero(labels == s.label) * voxel_ml for s in lm.segments]
    assert units == {"ml"}
    assert len(volumes) == 2
    assert np.allclose(volumes, counted, rtol=0.01)
    assert refs == [(seg.SOPInstanceUID, 1), (seg.SOPInstanceUID, 2)]


@pytest.fixture(scope="module")
def bone_stl(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("stl")
    (mesh,), written = run_and_write(source, out, "mesh.surface", 3, segment="bone")
    return mesh, written, out


def test_encapsulated_stl(bone_stl, source) -> None:
    from stl import mesh as stlmesh

    mesh, (w,), _ = bone_stl
    assert w.kind == "stl" and w.sop_class_uid == "1.2.840.10008.5.1.4.1.1.104.3"
    ds = pydicom.dcmread(w.path)
    assert ds.Modality == "M3D" and ds.MIMETypeOfEncapsulatedDocument == "model/stl"
    assert ds.FrameOfReferenceUID == source.first.FrameOfReferenceUID
    assert ds.StudyInstanceUID == source.study_uid
    assert len(ds.EncapsulatedDocument) % 2 == 0
    assert ds.EncapsulatedDocumentLength == len(ds.EncapsulatedDocument)
    parsed = stlmesh.Mesh.from_file("bone.stl", fh=io.BytesIO(bytes(ds.EncapsulatedDocument)))
    assert len(parsed.vectors) == len(mesh.faces) > 100
    pts = parsed.vectors.reshape(-1, 3)
    img = source.volume.image
    size = np.array(img.GetSize())
    corners = np.array(
        [
            img.TransformContinuousIndexToPhysicalPoint([float(c) for c in idx])
            for idx in np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in size])).reshape(3, -1).T
        ]
    )
    assert np.all(pts >= corners.min(0) - 1e-3) and np.all(pts <= corners.max(0) + 1e-3)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed")
def test_stl_has_no_dciodvfy_error(bone_stl) -> None:
    assert dciodvfy_errors(bone_stl[1][0].path) == []


def test_export_stl_and_obj(bone_stl, tmp_path) -> None:
    from stl import mesh as stlmesh

    mesh = bone_stl[0]
    parsed = stlmesh.Mesh.from_file(str(export_mesh(mesh, tmp_path / "bone.stl")))
    assert np.allclose(parsed.vectors, mesh.vertices[mesh.faces])
    lines = (export_mesh(mesh, tmp_path / "bone.obj")).read_text().splitlines()
    assert sum(ln.startswith("v ") for ln in lines) == len(mesh.vertices)
    assert sum(ln.startswith("f ") for ln in lines) == len(mesh.faces)
    with pytest.raises(ValueError):
        export_mesh(mesh, tmp_path / "bone.ply")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not installed")
def test_rotating_mip_series_is_valid_dicom(source, tmp_path) -> None:
    (series,), written = run_and_write(
        source, tmp_path, "projection.rotating_mip", 4, views=8, exclude_segment="bone"
    )
    assert len(written) == 8 and len({w.series_uid for w in written}) == 1
    for w in (written[0], written[5]):
        assert dciodvfy_errors(w.path) == []
    ds = pydicom.dcmread(written[5].path)
    ipp, iop = series.slice_geometry[5]
    assert np.allclose([float(x) for x in ds.ImagePositionPatient], ipp, atol=1e-3)
    assert np.allclose([float(x) for x in ds.ImageOrientationPatient], iop, atol=1e-5)


def test_uids_are_deterministic_and_follow_params(lungs, source, tmp_path) -> None:
    _, first = lungs
    _, again = run_and_write(source, tmp_path / "again", "segment.lungs")
    assert [w.sop_instance_uid for w in again] == [w.sop_instance_uid for w in first]
    _, other = run_and_write(source, tmp_path / "other", "segment.lungs", threshold_hu=-450)
    assert not {w.sop_instance_uid for w in other} & {w.sop_instance_uid for w in first}
