"""The step registry's contract with step authors: output kinds, queues, re-imports, empty
results, SEG algorithm, and the import graph of pipelines/ (no cycle through the built-ins)."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import grimp
import numpy as np
import pytest
import SimpleITK as sitk
from pydantic import BaseModel

from pipelines import (
    Code,
    Labelmap,
    Measurement,
    Measurements,
    Mesh,
    Output,
    SegAlgorithm,
    Segment,
    StepError,
    Volume,
    get_step,
    output_kind,
    output_kinds,
    registry,
    step,
    types,
)
from pipelines.queues import PRIORITIES, QUEUES, broker_priority
from pipelines.rules.model import Rule
from pipelines.types import HOUNSFIELD_UNIT, MILLILITER, MORPHOLOGICAL_OPERATIONS

ORGAN = Code("91723000", "SCT", "Anatomical Structure")
LIVER = Segment(1, "Liver", ORGAN, Code("10200004", "SCT", "Liver"))
SPLEEN = Segment(2, "Spleen", ORGAN, Code("78961009", "SCT", "Spleen"))
VOLUME = Code("118565006", "SCT", "Volume")
DENSITY = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")


class NoParams(BaseModel, frozen=True, extra="forbid"):
    pass


@pytest.fixture
def scratch() -> Iterator[list[str]]:
    """Names of steps a test registers; removed afterwards so the catalog stays the product's."""
    names: list[str] = []
    kinds = set(types._KINDS)
    yield names
    for n in names:
        registry._REGISTRY.pop(n, None)
    for k in set(types._KINDS) - kinds:
        del types._KINDS[k]


def ct(size: int = 8) -> Volume:
    img = sitk.GetImageFromArray(np.zeros((size, size, size), np.int16))
    return Volume(img, "CT")


def labelmap(labels: np.ndarray, *segments: Segment) -> Labelmap:
    return Labelmap("organs", sitk.GetImageFromArray(labels.astype(np.uint8)), segments)


# -- import graph ------------------------------------------------------------------------------


def test_registry_and_builtin_steps_do_not_import_each_other():
    graph = grimp.build_graph("pipelines")
    assert not graph.find_modules_directly_imported_by("pipelines.registry") & {
        m for m in graph.modules if m.startswith("pipelines.steps")
    }
    # the loader sits above both: it imports the built-ins, nothing below imports it
    assert graph.direct_import_exists(importer="pipelines.catalog", imported="pipelines.steps")
    assert not graph.find_modules_that_directly_import("pipelines.catalog") - {
        "pipelines",
        "pipelines.rules.loader",
        "pipelines.testing",
    }
    assert get_step("segment.lungs").produces == ("labelmap",)  # loading still happens


# -- output kinds ------------------------------------------------------------------------------


def test_built_in_output_kinds_are_registered_and_measurements_is_one():
    kinds = output_kinds()
    assert {"series", "labelmap", "mesh", "measurements"} <= set(kinds)
    assert kinds["measurements"] is Measurements


def test_step_producing_measurements_registers_and_runs(scratch):
    scratch.append("test.liver_density")

    @step("test.liver_density", version="1.0.0", params=NoParams, produces="measurements")
    def density(volume: Volume, params: NoParams) -> Measurements:
        """Mean HU of the liver."""
        m = Measurement(DENSITY, 54.5, HOUNSFIELD_UNIT, segment=LIVER, derivation=MEAN)
        return Measurements("liver density", [m])

    (out,) = get_step("test.liver_density")(ct(), NoParams())
    assert isinstance(out, Measurements)
    assert out.measurements[0].value == 54.5 and out.measurements[0].unit.value == "[hnsf'U]"


def test_unknown_output_kind_is_refused_naming_the_known_ones(scratch):
    with pytest.raises(ValueError) as e:
        step("test.odd", version="1.0.0", params=NoParams, produces="histogram")(lambda v, p: None)
    msg = str(e.value)
    assert "unknown output kind(s) ['histogram']" in msg
    assert "labelmap, measurements, mesh, series" in msg and "output_kind" in msg


def test_a_kind_is_known_once_registered(scratch):
    @dataclass
    class Histogram(Output):
        kind: ClassVar[str] = "histogram"
        counts: tuple[int, ...] = ()

    def hist(volume: Volume, params: NoParams) -> Histogram:
        """Histogram of the volume."""
        return Histogram("hist", (1, 2))

    with pytest.raises(ValueError, match="unknown output kind"):
        step("test.hist", version="1.0.0", params=NoParams, produces="histogram")(hist)
    output_kind(Histogram)
    output_kind(Histogram)  # the same class again: harmless
    scratch.append("test.hist")
    step("test.hist", version="1.0.0", params=NoParams, produces="histogram")(hist)
    assert get_step("test.hist")(ct(), NoParams())[0].counts == (1, 2)

    @dataclass
    class OtherHistogram(Output):
        kind: ClassVar[str] = "histogram"

    with pytest.raises(ValueError, match="registered twice: .*Histogram and .*OtherHistogram"):
        output_kind(OtherHistogram)


def test_step_returning_an_undeclared_kind_is_an_internal_error(scratch):
    scratch.append("test.liar")

    @step("test.liar", version="1.0.0", params=NoParams, produces="series")
    def liar(volume: Volume, params: NoParams) -> Measurements:
        """Claims a series, returns measurements."""
        return Measurements("m", [Measurement(VOLUME, 1.0, MILLILITER)])

    with pytest.raises(TypeError, match="returned measurements, declared"):
        get_step("test.liar")(ct(), NoParams())


# -- Measurement -------------------------------------------------------------------------------


def test_measurement_units_must_be_ucum_and_values_numbers():
    with pytest.raises(ValueError, match="not UCUM"):
        Measurements("m", [Measurement(VOLUME, 1.0, Code("ml", "DCM", "milliliter"))])
    with pytest.raises(StepError, match="Volume is not a number"):
        Measurements("m", [Measurement(VOLUME, float("nan"), MILLILITER)])


def test_measurements_group_by_segment_whole_series_first():
    ms = Measurements(
        "m",
        [
            Measurement(VOLUME, 1.0, MILLILITER, segment=LIVER),
            Measurement(VOLUME, 2.0, MILLILITER, segment=SPLEEN),
            Measurement(DENSITY, 40.0, HOUNSFIELD_UNIT),
            Measurement(DENSITY, 55.0, HOUNSFIELD_UNIT, segment=LIVER, derivation=MEAN),
        ],
    )
    groups = ms.by_segment()
    assert list(groups) == [None, LIVER, SPLEEN]
    assert [m.value for m in groups[LIVER]] == [1.0, 55.0]


# -- resource = a queue ------------------------------------------------------------------------


def test_resource_must_name_a_queue(scratch):
    def f(volume: Volume, params: NoParams) -> Measurements:
        """Doc."""
        return Measurements("m", [Measurement(VOLUME, 1.0, MILLILITER)])

    with pytest.raises(ValueError, match="resource 'gpu' is not a queue; one of cpu, io"):
        step("test.gpu", version="1.0.0", params=NoParams, produces="measurements", resource="gpu")(
            f
        )
    scratch.append("test.io")
    step("test.io", version="1.0.0", params=NoParams, produces="measurements", resource="io")(f)
    assert get_step("test.io").resource == "io"
    assert all(s.resource in QUEUES for s in registry.registered_steps().values())


def test_priorities_written_once_rule_levels_and_broker_priorities():
    assert PRIORITIES == {"urgent": 2, "normal": 1, "low": 0}
    assert [broker_priority(PRIORITIES[p]) for p in ("urgent", "normal", "low")] == [9, 5, 1]
    rule = Rule("r", (), (), (), "first", (), priority="urgent")
    assert rule.priority_level == 2


# -- registration on re-import -----------------------------------------------------------------

PLUGIN = '''
from pydantic import BaseModel
from pipelines import Measurement, Measurements, step
from pipelines.types import MILLILITER, Code

class P(BaseModel):
    pass

@step("test.plugin_volume", version="1.0.0", params=P, produces="measurements")
def volume(volume, params):
    """Two-argument step (no prior)."""
    return Measurements("v", [Measurement(Code("118565006", "SCT", "Volume"), {v}, MILLILITER)])
'''


@pytest.fixture
def plugin_dir(tmp_path, scratch):
    scratch.append("test.plugin_volume")
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for m in ("sprim_test_plugin_a", "sprim_test_plugin_b"):
        sys.modules.pop(m, None)


def test_reimporting_a_two_argument_step_re_registers_silently(plugin_dir):
    path = plugin_dir / "sprim_test_plugin_a.py"
    path.write_text(textwrap.dedent(PLUGIN.format(v=1.0)))
    mod = importlib.import_module("sprim_test_plugin_a")
    path.write_text(textwrap.dedent(PLUGIN.format(v=22.5)))  # another size: no stale .pyc
    importlib.reload(mod)
    sys.modules.pop("sprim_test_plugin_a")
    importlib.import_module("sprim_test_plugin_a")  # imported again under the same name
    st = get_step("test.plugin_volume")
    (out,) = st(ct(), st.validate())
    assert out.measurements[0].value == 22.5  # the latest definition runs


def test_another_function_under_the_same_name_is_refused_naming_both_modules(plugin_dir):
    (plugin_dir / "sprim_test_plugin_a.py").write_text(textwrap.dedent(PLUGIN.format(v=1.0)))
    (plugin_dir / "sprim_test_plugin_b.py").write_text(textwrap.dedent(PLUGIN.format(v=1.0)))
    importlib.import_module("sprim_test_plugin_a")
    with pytest.raises(ValueError) as e:
        importlib.import_module("sprim_test_plugin_b")
    assert str(e.value) == (
        "step test.plugin_volume is registered twice: by sprim_test_plugin_a.volume "
        "and by sprim_test_plugin_b.volume"
    )


# -- empty results -----------------------------------------------------------------------------


def _register(scratch: list[str], name: str, produces: str, result: object, **kw: object) -> None:
    scratch.append(name)

    def fn(volume: Volume, params: NoParams, prior: object = ()) -> object:
        """Returns a fixed result."""
        return result

    step(name, version="1.0.0", params=NoParams, produces=produces, **kw)(fn)  # type: ignore[arg-type]


def test_empty_labelmap_is_a_step_error_naming_the_segments(scratch):
    labels = np.zeros((4, 4, 4))
    labels[0, 0, 0] = 7  # a voxel of no declared segment does not count
    _register(scratch, "test.empty_seg", "labelmap", labelmap(labels, LIVER, SPLEEN))
    with pytest.raises(StepError) as e:
        get_step("test.empty_seg")(ct(), NoParams())
    assert str(e.value) == (
        "test.empty_seg produced nothing to write: no voxel of Liver or Spleen was found in "
        "this series"
    )


def test_labelmap_with_one_voxel_of_one_segment_is_not_empty(scratch):
    labels = np.zeros((4, 4, 4))
    labels[1, 2, 3] = 2
    _register(scratch, "test.tiny_seg", "labelmap", labelmap(labels, LIVER, SPLEEN))
    (out,) = get_step("test.tiny_seg")(ct(), NoParams())
    assert isinstance(out, Labelmap)


def test_empty_mesh_and_empty_measurements_are_step_errors(scratch):
    mesh = Mesh("3D Liver", np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), LIVER)
    _register(scratch, "test.empty_mesh", "mesh", mesh)
    with pytest.raises(StepError, match="the surface of segment 'Liver' has no triangles"):
        get_step("test.empty_mesh")(ct(), NoParams())
    _register(scratch, "test.no_numbers", "measurements", Measurements("stats", []))
    with pytest.raises(StepError, match="'stats' holds no measurement"):
        get_step("test.no_numbers")(ct(), NoParams())


def test_drop_empty_leaves_empty_outputs_out_but_fails_when_nothing_is_left(scratch):
    full = Measurements("a", [Measurement(VOLUME, 3.0, MILLILITER)])
    _register(
        scratch,
        "test.some_empty",
        "measurements",
        [Measurements("b", []), full],
        drop_empty=True,
    )
    assert get_step("test.some_empty")(ct(), NoParams()) == [full]
    _register(scratch, "test.all_empty", "measurements", [Measurements("b", [])], drop_empty=True)
    with pytest.raises(StepError, match="holds no measurement"):
        get_step("test.all_empty")(ct(), NoParams())


# -- SEG algorithm ------------------------------------------------------------------------------


def test_seg_algorithm_defaults_to_morphological_operations_and_is_per_step(scratch):
    assert get_step("segment.body").seg_algorithm == SegAlgorithm(MORPHOLOGICAL_OPERATIONS)
    assert get_step("segment.body").seg_algorithm.type == "AUTOMATIC"
    ai = SegAlgorithm(Code("123110", "DCM", "Artificial Intelligence"), "SEMIAUTOMATIC")
    labels = np.ones((2, 2, 2))
    _register(scratch, "test.ai_seg", "labelmap", labelmap(labels, LIVER), seg_algorithm=ai)
    assert get_step("test.ai_seg").seg_algorithm == ai


def test_seg_algorithm_is_checked():
    with pytest.raises(ValueError, match="AUTOMATIC, SEMIAUTOMATIC"):
        SegAlgorithm(type="MANUAL")
    with pytest.raises(ValueError, match="not a CID 7162"):
        SegAlgorithm(Code("373098007", "SCT", "Mean"))
    with pytest.raises(ValueError, match="seg_algorithm is for steps that produce a labelmap"):
        step(
            "test.seg_algo_series",
            version="1.0.0",
            params=NoParams,
            produces="mesh",
            seg_algorithm=SegAlgorithm(),
        )(lambda v, p: None)
