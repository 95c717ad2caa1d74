"""measure.segment_stats: segment volumes and CT density, against the phantom's ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from pipelines import Code, Labelmap, Measurements, Segment, StepError, get_step
from pipelines.steps.measure import ATTENUATION, MEAN, STANDARD_DEVIATION, VOLUME
from pipelines.testing import CT_NOISE_HU, HU_LUNG, chest_ct, head_mr, run_step

VENTRICLES = Segment(
    1,
    "Ventricles",
    Code("91723000", "SCT", "Anatomical Structure"),
    Code("35764002", "SCT", "Brain ventricle"),
)


@pytest.fixture(scope="module")
def chest():
    return chest_ct(n_slices=40, size=128, spacing=(2.5, 2.5, 2.5))


def by(out: Measurements, segment: str, name: str, derivation: object = None) -> float:
    (m,) = [
        m
        for m in out.measurements
        if m.segment and m.segment.name == segment and m.name == name and m.derivation == derivation
    ]
    return m.value


def test_lung_volumes_and_density_match_the_phantom(chest):
    (labelmap,) = run_step("segment.lungs", chest.volume)
    (out,) = run_step("measure.segment_stats", chest.volume, prior=[labelmap], segment="lungs")
    assert isinstance(out, Measurements)
    voxel_ml = 2.5**3 / 1000
    for label, name in ((1, "Right lung"), (2, "Left lung")):
        truth_ml = np.count_nonzero(chest.lungs == label) * voxel_ml
        assert by(out, name, VOLUME) == pytest.approx(truth_ml, rel=0.05)
        # the same segments as the labelmap's: the SR can reference them in its SEG
        assert any(m.segment in labelmap.segments for m in out.measurements)
        assert by(out, name, ATTENUATION, MEAN) == pytest.approx(HU_LUNG, abs=15)
        assert by(out, name, ATTENUATION, STANDARD_DEVIATION) == pytest.approx(CT_NOISE_HU, abs=10)
    units = {m.name.meaning: m.unit.value for m in out.measurements}
    assert units == {"Volume": "ml", "Attenuation Coefficient": "[hnsf'U]"}


def test_segment_made_on_demand_when_no_earlier_labelmap(chest):
    (out,) = run_step("measure.segment_stats", chest.volume, segment="bone")
    assert [m.segment.name for m in out.measurements] == ["Bone"] * 3
    assert by(out, "Bone", VOLUME) > 0


def test_mr_gets_volumes_only():
    mr = head_mr(n_slices=24, size=96, spacing=(2.0, 2.0, 4.0))
    labels = sitk.GetImageFromArray(mr.ventricles.astype(np.uint8))
    labels.CopyInformation(mr.volume.image)
    lm = Labelmap("ventricles", labels, (VENTRICLES,))
    (out,) = run_step("measure.segment_stats", mr.volume, prior=[lm], segment="ventricles")
    assert [m.name for m in out.measurements] == [VOLUME]  # no HU on MR
    truth_ml = np.count_nonzero(mr.ventricles) * 2.0 * 2.0 * 4.0 / 1000
    assert out.measurements[0].value == pytest.approx(truth_ml, abs=0.001)


def test_unknown_segment_is_a_step_error(chest):
    with pytest.raises(StepError, match="no segment 'liver'"):
        run_step("measure.segment_stats", chest.volume, segment="liver")


def test_registered_as_a_measurements_step():
    st = get_step("measure.segment_stats")
    assert st.produces == ("measurements",) and st.resource == "cpu"
