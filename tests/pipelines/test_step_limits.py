"""Step params are bounded, and each step's largest buffer is estimated before it runs."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import SimpleITK as sitk
from pydantic import BaseModel, ValidationError

from pipelines import StepError, Volume, all_steps, get_step
from pipelines.registry import params_error_text

LIMIT = 2048 * 2**20


def _numeric(annotation) -> bool:
    args = typing.get_args(annotation) or (annotation,)
    return any(a in (int, float) for a in args)


def _bounded(field) -> tuple[bool, bool]:
    lo = hi = False
    for m in field.metadata:
        lo |= getattr(m, "ge", None) is not None or getattr(m, "gt", None) is not None
        hi |= getattr(m, "le", None) is not None or getattr(m, "lt", None) is not None
    return lo, hi


BUILT_IN = [s for s in all_steps() if s.params.__module__.startswith("pipelines.steps.")]


def test_built_in_steps_are_all_checked() -> None:
    assert len(BUILT_IN) == 7, [s.name for s in BUILT_IN]


@pytest.mark.parametrize("st", BUILT_IN, ids=lambda s: s.name)
def test_every_numeric_and_free_text_param_is_bounded(st) -> None:
    """No param a rule, `sprim run --set` or the API could set to an absurd value."""
    model: type[BaseModel] = st.params
    for name, field in model.model_fields.items():
        if _numeric(field.annotation):
            assert _bounded(field) == (True, True), f"{st.name}.{name} needs lower and upper bounds"
        elif str in (typing.get_args(field.annotation) or (field.annotation,)):
            assert any(getattr(m, "max_length", None) for m in field.metadata), (
                f"{st.name}.{name}: free text needs a max_length"
            )


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("reformat.mpr", {"spacing_mm": 1e-6}, "spacing_mm=1e-06: Input should be greater"),
        ("reformat.mpr", {"thickness_mm": 0.0}, "thickness_mm=0.0"),
        ("reformat.mpr", {"pixel_spacing_mm": 0.001}, "pixel_spacing_mm=0.001"),
        ("reformat.mpr", {"thickness_mm": 1e9}, "less than or equal to 500"),
        ("projection.rotating_mip", {"pixel_mm": 0.001}, "pixel_mm=0.001"),
        ("projection.rotating_mip", {"views": 100000}, "views=100000"),
        ("mesh.surface", {"max_triangles": 10**9}, "max_triangles=1000000000"),
        ("mesh.surface", {"segment": "x" * 1000}, "segment='xxxx"),
        ("segment.bone", {"lower_hu": 1e6}, "lower_hu=1000000.0"),
        ("segment.bone", {"coarse_mm": 1e-4}, "coarse_mm=0.0001"),
        ("segment.lungs", {"coarse_mm": 0.0}, "coarse_mm=0.0"),
        ("segment.body", {"opening_mm": 1e9}, "opening_mm=1000000000.0"),
    ],
)
def test_absurd_params_are_refused_in_words(name: str, params: dict, expected: str) -> None:
    with pytest.raises(ValidationError) as e:
        get_step(name).validate(params)
    text = params_error_text(e.value)
    assert expected in text
    assert "errors.pydantic.dev" not in text and "\n" not in text


def _volume(size=(40, 50, 30), spacing=(0.8, 0.9, 2.0), direction=None) -> Volume:
    a = np.full(size[::-1], -1000, np.int16)
    a[5:-5, 8:-8, 6:-6] = 40
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(spacing)
    if direction is not None:
        img.SetDirection(direction)
    return Volume(img, "CT")


def _geometry(v: Volume) -> tuple[tuple, tuple, tuple]:
    img = v.image
    return img.GetSize()[::-1], img.GetSpacing(), img.GetDirection()


TILTED = tuple(
    np.array(sitk.VersorTransform((0.3, 1.0, 0.2), math.radians(25)).GetMatrix()).tolist()
)


@pytest.mark.parametrize("direction", [None, TILTED], ids=["aligned", "oblique"])
@pytest.mark.parametrize(
    "params",
    [{}, {"spacing_mm": 1.3}, {"pixel_spacing_mm": 0.5}, {"thickness_mm": 5, "mode": "MIP"}],
)
def test_reformat_estimate_bounds_the_real_output(direction, params: dict) -> None:
    st = get_step("reformat.mpr")
    v = _volume(direction=direction)
    p = st.validate(params)
    n_bytes, what = st.estimate(p, *_geometry(v))
    biggest = max(4 * math.prod(o.image.GetSize()) for o in st(v, p))
    assert biggest <= n_bytes, (biggest, n_bytes, what)
    if direction is None:  # exact grid on the fast path, up to a rounded-up row or column
        assert n_bytes <= 1.2 * biggest, (biggest, n_bytes, what)


def test_rotating_mip_estimate_bounds_the_real_output() -> None:
    st = get_step("projection.rotating_mip")
    v = _volume()
    p = st.validate({"views": 12, "pixel_mm": 1.0})
    n_bytes, _ = st.estimate(p, *_geometry(v))
    (out,) = st(v, p)
    assert sitk.GetArrayViewFromImage(out.image).nbytes <= n_bytes


def test_output_size_refusal_names_the_output_the_params_and_the_limit() -> None:
    """A 512x512x2000 series at 0.5 mm: 0.1 mm slices would be a 10 GB stack."""
    st = get_step("reformat.mpr")
    with pytest.raises(StepError) as e:
        st.check_output_size(st.validate({"spacing_mm": 0.1}), (2000, 512, 512), (0.5,) * 3, LIMIT)
    assert str(e.value) == (
        "the axial reformat of 512x512x9971 pixels (spacing_mm=0.1, pixel_spacing_mm=0.5) would "
        "need 9.74 GB, above the 2048 MB limit (SPRIM_MAX_VOLUME_MB)"
    )
    # The defaults on a real abdomen CT geometry pass, for every step.
    for s in all_steps():
        s.check_output_size(s.validate({}), (134, 512, 512), (1.07, 1.07, 3.0), LIMIT)


def test_a_step_without_an_estimate_counts_a_working_array_on_the_source_grid() -> None:
    st = get_step("segment.bone")
    assert st.estimate(st.validate({}), (134, 512, 512), (1.0, 1.0, 3.0)) == (
        4 * 134 * 512 * 512,
        "a working array on the 512x512x134 source grid",
    )
    with pytest.raises(StepError, match="working array on the 2048x2048x2000 source grid"):
        st.check_output_size(st.validate({}), (2000, 2048, 2048), (0.2, 0.2, 0.2), LIMIT)


def test_header_pixel_spacing_of_100_mm_is_refused_before_the_views_are_allocated() -> None:
    """A 100 mm PixelSpacing made the rotating MIP ask for gigabytes of ray positions."""
    st = get_step("projection.rotating_mip")
    p = st.validate({})
    with pytest.raises(StepError, match=r"pixel_mm=2 would make views 36206 pixels wide"):
        st.check_output_size(p, (134, 512, 512), (100.0, 100.0, 3.0), LIMIT)
    tiny = _volume(size=(24, 24, 12), spacing=(1000.0, 1000.0, 3.0))  # 8 m of "patient"
    with pytest.raises(StepError, match="pixels wide"):  # and in the step itself
        st(tiny, p)


def test_sprim_steps_shows_each_param_range() -> None:
    from pipelines.registry import param_range

    fields = get_step("reformat.mpr").params.model_fields
    assert param_range(fields["spacing_mm"]) == "[0.1, 500]"
    assert param_range(fields["mode"]) == ""
    mip = get_step("projection.rotating_mip").params.model_fields
    assert param_range(mip["arc_deg"]) == "(0, 360]"
    assert param_range(mip["exclude_segment"]) == "1-64 chars"
