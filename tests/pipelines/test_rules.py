"""Routing rules: load-time validation with file:line, closed operators, route, explain."""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path

import pytest

from pipelines.rules import RulesError, explain, format_explain, load_rules, route
from tests.platform_kit import ROOT, VENV_BIN

CT_SERIES = Path("/work/shared/data/ct-abdomen-tcia/series")

GOOD = textwrap.dedent("""\
    rules:
      - name: ct-chest
        trigger: {on: study_stable, quiet_period: 30s}
        match:
          Modality: {in: [CT]}
          BodyPartExamined: {in: [CHEST, THORAX]}
        select_series:
          where: {ImageType: {contains_all: [ORIGINAL, PRIMARY, AXIAL]}, SliceThickness: {lte: 1.5}}
          exclude: {SeriesDescription: {regex: "(?i)scout|localizer|dose"}}
          prefer: thinnest
        run:
          - {use: reformat.mpr, with: {planes: [coronal, sagittal], thickness_mm: 3}}
        priority: urgent
      - name: mr-any
        match: {Modality: MR, institution: {eq: NORTH}}
        run: [reformat.mpr]
        destination: pacs-north
    """)


def _series(uid: str, **kw):
    base = {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": uid, "Modality": "CT",
            "BodyPartExamined": "CHEST", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "SliceThickness": 1.0, "SeriesDescription": "AX 1mm", "NumberOfSeriesRelatedInstances": 300}  # fmt: skip
    base.update(kw)
    return base


def test_good_rules_load_with_validated_params():
    rs = load_rules(GOOD, name="good.yaml")
    assert [r.name for r in rs.rules] == ["ct-chest", "mr-any"]
    r = rs.get("ct-chest")
    assert r.quiet_period_s == 30 and r.priority == "urgent" and r.priority_level == 2
    assert r.run[0].params.thickness_mm == 3
    assert rs.get("mr-any").destination == "pacs-north"
    assert len(rs.digest) == 16


@pytest.mark.parametrize(
    ("old", "new", "line", "words"),
    [
        ("thickness_mm: 3}", "thickness_mm: -3}", 12, "thickness_mm"),
        ("thickness_mm: 3}", "thikness_mm: 3}", 12, "thikness_mm"),
        ("use: reformat.mpr, with", "use: reformat.mrp, with", 12, "unknown step 'reformat.mrp'"),
        ("{in: [CT]}", "{among: [CT]}", 5, "unknown operator 'among'"),
        ("{lte: 1.5}", "{lte: thin}", 8, "lte needs a number"),
        ('"(?i)scout|localizer|dose"', '"(unclosed"', 9, "bad regex"),
        ("priority: urgent", "priority: asap", 13, "priority 'asap'"),
        ("prefer: thinnest", "prefer: thickest", 10, "prefer 'thickest'"),
        ("quiet_period: 30s", "quiet_period: soon", 3, "quiet_period"),
        ("BodyPartExamined:", "BodyPartExamnd:", 6, "did you mean BodyPartExamined"),
        ("  - name: mr-any", "  - name: ct-chest", 14, "duplicate rule name"),
        ("    priority: urgent", "    priority: urgent: now", 13, "YAML"),
    ],
)
def test_malformed_rules_are_refused_with_file_and_line(old, new, line, words):
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    with pytest.raises(RulesError) as e:
        load_rules(text, name="site.yaml")
    assert e.value.file == "site.yaml"
    assert e.value.line == line, str(e.value)
    assert words in str(e.value)
    assert str(e.value).startswith(f"site.yaml:{line}: ")


def test_route_selects_thinnest_and_excludes_scouts():
    rs = load_rules(GOOD)
    series = [
        _series("1", SliceThickness=1.0),
        _series("2", SliceThickness=0.625),
        _series("3", SliceThickness=0.5, SeriesDescription="Scout"),
        _series("4", SliceThickness=5.0),
        _series("5", Modality="SR", SliceThickness=None),
    ]
    ms = route(rs, series)
    assert [(m.rule.name, m.series_uid) for m in ms] == [("ct-chest", "2")]


def test_missing_or_odd_attributes_never_crash_and_are_explained():
    rs = load_rules(GOOD)
    odd = [
        {"SeriesInstanceUID": "x"},  # nearly nothing
        _series("y", SliceThickness="n/a", ImageType="ORIGINAL\\PRIMARY\\AXIAL"),
        _series("z", BodyPartExamined=None, ImageType=None),
        _series("w", SliceThickness=[1.0, 2.0], Modality=["CT"]),
    ]
    assert route(rs, odd) == []
    v = {sv.series_uid: sv.reason for sv in explain(rs, odd)[0].series}
    assert v["x"] == "match: Modality: missing (want in ['CT'])"
    assert v["y"] == "select_series.where: SliceThickness: 'n/a' is not a number (want lte 1.5)"
    assert v["z"].startswith("match: BodyPartExamined: missing")


#: Values an archive or a bad header may hand a condition, including the awkward ones for each
#: operator: numbers beyond float, NaN, text for numeric operators, bytes, nested and mixed lists.
ODD_VALUES = [
    None, [], [None], "", " ", "n/a", "1e999", "nan", b"\x00\xff", b"CT", float("nan"),
    float("inf"), 10**400, -(10**400), [10**400, "CT"], [[1.0]], [b"x", None], ["ORIGINAL", 3, None],
    {"Alphabetic": "DOE^J"}, True, "A\\B", ("CT",),
]  # fmt: skip
#: Every operator, on its fast path (one specialised predicate) and its generic path (mixed ops).
ODD_SPECS = [
    "CT", 1.5, {"eq": ["A", "B"]}, {"in": ["CT", "MR"]}, {"in": [1, 2.5, 10**400]}, {"lt": 1.5},
    {"lte": 10**400}, {"gt": -1}, {"gte": 0.0}, {"regex": "(?i)ct"}, {"contains": "A"},
    {"contains": 3}, {"contains_all": ["A", "B"]}, {"contains_all": [3, 10**400]},
    {"exists": True}, {"exists": False}, {"lt": 3, "contains": "A"}, {"regex": "A", "in": ["CT"]},
]  # fmt: skip


@pytest.mark.parametrize("spec", ODD_SPECS, ids=repr)
def test_odd_values_never_crash_a_condition(spec):
    from pipelines.rules import compile_condition

    c = compile_condition("SliceThickness", spec)
    for v in ODD_VALUES:
        got = c.test({"SliceThickness": v})
        assert got is True or got is False, (v, got)
        why = c.why_not({"SliceThickness": v})
        assert (why is None) is got and (got or why.startswith("SliceThickness: ")), (v, why)
    assert c.test({}) is (spec == {"exists": False})


def test_odd_values_fail_numeric_conditions():
    from pipelines.rules import compile_condition

    lte = compile_condition("SliceThickness", {"lte": 1.5})
    for v in (float("nan"), "n/a", "1e999", b"1.0", [1.0, 2.0], None, [], {"v": 1.0}):
        assert lte.test({"SliceThickness": v}) is False, v
    assert lte.test({"SliceThickness": "1.0"}) and lte.test({"SliceThickness": [1.0]})
    mixed = compile_condition("SliceThickness", {"lt": 3, "contains": "2"})  # generic path
    assert mixed.test({"SliceThickness": "2"}) and not mixed.test({"SliceThickness": 10**400})
    why = lte.why_not({"SliceThickness": 10**400})
    assert why == f"SliceThickness: {10**400!r} not <= 1.5"
    assert (
        lte.why_not({"SliceThickness": "n/a"})
        == "SliceThickness: 'n/a' is not a number (want lte 1.5)"
    )


def test_context_keys_match_calling_ae_source_institution():
    rs = load_rules(GOOD)
    mr = [_series("m", Modality="MR")]
    assert route(rs, mr, {"institution": "SOUTH"}) == []
    [m] = route(rs, mr, {"institution": "NORTH", "calling_ae": "MRI1", "source": "orthanc"})
    assert m.rule.name == "mr-any"
    why = explain(rs, mr, {"institution": "SOUTH"})[1].series[0].reason
    assert why == "match: institution: 'SOUTH' != 'NORTH'"


def test_rules_check_cli_refuses_with_file_line(tmp_path):
    from typer.testing import CliRunner

    from tasks.main import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("thickness_mm: 3}", "thickness_mm: -3}"))
    r = CliRunner().invoke(app, ["rules", "check", str(bad)])
    assert r.exit_code == 2
    assert f"{bad}:12: rule ct-chest: step reformat.mpr param thickness_mm" in r.output.replace(
        "\n", ""
    )
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    r = CliRunner().invoke(app, ["rules", "check", str(good)])
    assert r.exit_code == 0, r.output
    assert "2 rules" in " ".join(r.output.split())


@pytest.mark.skipif(not CT_SERIES.exists(), reason="sample CT missing")
def test_rules_explain_on_real_series_names_the_failed_condition(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(GOOD)
    r = subprocess.run([str(VENV_BIN / "sprim"), "rules", "explain", str(rules), str(CT_SERIES)],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    out = " ".join(r.stdout.split())
    # the real series is a 3 mm CT CHEST: ct-chest fails on SliceThickness, mr-any on Modality
    assert "rule ct-chest: no match" in out
    assert "select_series.where: SliceThickness: 3.0 not <= 1.5" in out
    assert "rule mr-any: no match" in out
    assert "match: Modality: 'CT' != 'MR'" in out


def test_explain_text_lists_picked_series():
    rs = load_rules(GOOD)
    text = format_explain(explain(rs, [_series("1"), _series("2", SliceThickness=0.6)]))
    assert "rule ct-chest: MATCHED" in text
    assert "[picked]" in text and "[candidate]" in text


def test_default_rules_file_is_valid():
    from workers.processing.routing import DEFAULT_RULES, load_rules_file

    rs = load_rules_file(DEFAULT_RULES)
    assert {s.use for r in rs.rules for s in r.run} == {
        "reformat.mpr",
        "segment.lungs",
        "segment.body",
        "segment.bone",
        "mesh.surface",
        "projection.rotating_mip",
    }


def test_hot_reload_keeps_good_rules_on_a_bad_edit(tmp_path):
    import os

    from workers.platform.jobstore import JobStore
    from workers.processing.routing import RuleSource

    store = JobStore(f"sqlite:///{tmp_path / 'j.db'}")
    store.migrate()
    f = tmp_path / "r.yaml"
    f.write_text(GOOD)
    src = RuleSource(f)
    first = src.get(store)
    f.write_text(GOOD.replace("thickness_mm: 3}", "thickness_mm: -3}"))
    os.utime(f, ns=(1, 1))
    assert src.get(store) is first  # a bad edit never replaces a good rule set
    assert src.last_error is not None and src.last_error.line == 12
    f.write_text(GOOD.replace("thickness_mm: 3}", "thickness_mm: 5}"))
    second = src.get(store)
    assert second.get("ct-chest").run[0].params.thickness_mm == 5
    events = [(a.event, a.detail) for a in store.audit_trail()]
    assert [e for e, _ in events] == ["rules_loaded", "rules_refused", "rules_reload"]
    assert ":12:" in events[1][1]
    store.dispose()


def test_rules_doc_tables_every_routing_attribute_and_default_rules_point_at_it():
    from pipelines.rules import ROUTING_KEYWORDS

    doc = (ROOT / "docs" / "rules.md").read_text()
    rows = {kw for line in doc.splitlines() if line.startswith("| `") for kw in
            re.findall(r"`([A-Za-z]+)`", line.split("|")[1])}  # fmt: skip
    assert set(ROUTING_KEYWORDS) <= rows, set(ROUTING_KEYWORDS) - rows
    assert "docs/rules.md" in (ROOT / "workers" / "processing" / "default_rules.yaml").read_text()


def test_is_volume_is_one_stack_of_at_least_three_images():
    from pipelines.rules import stack_attributes

    axial = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    stack = [(axial, [0.0, 0.0, z]) for z in (0.0, 1.5, 3.0, 6.0)]  # uneven spacing: one stack
    assert stack_attributes(4, stack) == {
        "NumberOfSeriesRelatedInstances": 4, "NumberOfImages": 4, "IsVolume": True,
    }  # fmt: skip
    assert not stack_attributes(2, stack[:2])["IsVolume"]  # two images
    assert not stack_attributes(1, stack + stack)["IsVolume"]  # two echoes at the same positions
    coronal = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    assert not stack_attributes(3, [*stack[:2], (coronal, [0.0, 0.0, 9.0])])["IsVolume"]
    assert not stack_attributes(3, [*stack[:2], (None, None)])["IsVolume"]
    tilted = [1.0, 0.0, 0.0, 0.0, 0.948, -0.317]  # gantry tilt: positions shift in y, still one
    assert stack_attributes(3, [(tilted, [0.0, 0.3 * k, 2.0 * k]) for k in range(3)])["IsVolume"]
