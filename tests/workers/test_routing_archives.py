"""One routing attribute set: a study routes the same from a folder (``sprim run``), the folder
archive (also the C-STORE listener's store) and DICOMweb (a real Orthanc), for rules on every
declared keyword; enhanced (multi-frame) volumes are routed by their images, not their files.
"""

from __future__ import annotations

import textwrap

import pydicom
import pytest

from pipelines.rules import ROUTING_KEYWORDS, explain, load_rules, route
from tests import routing_kit as rk
from workers.archives.dicomweb import DicomWebArchive
from workers.archives.folder import FolderArchive
from workers.processing.routing import DEFAULT_RULES, load_rules_file
from workers.processing.testing import dciodvfy_errors
from workers.reading.series import scan

#: One rule per declared keyword (more for the six the DICOMweb path once lacked); each must
#: fire on the test study.
EVERY_KEYWORD = textwrap.dedent("""\
    rules:
      - {name: study-uid, match: {StudyInstanceUID: {regex: "^1\\\\.2\\\\.826\\\\.0\\\\.1\\\\.3680043\\\\.8\\\\.498\\\\."}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: series-uid, match: {SeriesInstanceUID: {exists: true}}, select_series: {where: {SeriesNumber: 203}}, run: [reformat.mpr]}
      - {name: sop-class, match: {SOPClassUID: 1.2.840.10008.5.1.4.1.1.4.1}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: modality, match: {Modality: {in: [CT]}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: study-date, match: {StudyDate: {regex: "^2018"}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: accession, match: {AccessionNumber: ACCsame}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: study-description, match: {StudyDescription: {regex: "(?i)pancreas"}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: series-description, match: {SeriesDescription: {contains: magnitude}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: series-number, match: {SeriesNumber: {gte: 206}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: protocol, match: {ProtocolName: {regex: "(?i)brain"}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: body-part, match: {BodyPartExamined: {in: [HEAD, CHEST]}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: patient-position, match: {PatientPosition: HFS}, select_series: {prefer: most_images}, run: [reformat.mpr]}
      - {name: image-type, match: {ImageType: {contains_all: [ORIGINAL, M]}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: thin, match: {SliceThickness: {lte: 1.5}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: spacing-between, match: {SpacingBetweenSlices: {gt: 3.5}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: pixel-spacing, match: {PixelSpacing: {contains: 1.07421875}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: rows, match: {Rows: {eq: 512}}, select_series: {prefer: thinnest}, run: [reformat.mpr]}
      - {name: columns, match: {Columns: {lt: 100}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: frames, match: {NumberOfFrames: {gte: 20}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: kernel, match: {ConvolutionKernel: {in: [B]}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: kernel-ge, match: {ConvolutionKernel: {regex: "^STD"}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: contrast, match: {ContrastBolusAgent: {regex: "(?i)iomeprol"}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: frame-of-reference, match: {FrameOfReferenceUID: {regex: "^1\\\\.3\\\\.46\\\\."}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: institution, match: {InstitutionName: {regex: "(?i)vanderbilt"}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: station, match: {StationName: MRC35131}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: manufacturer, match: {Manufacturer: {regex: "^GE"}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: model, match: {ManufacturerModelName: {regex: "Brilliance"}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: instances, match: {NumberOfSeriesRelatedInstances: {gte: 25}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: images, match: {NumberOfImages: {gte: 30}}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: volume, match: {IsVolume: true, Modality: MR}, select_series: {prefer: all}, run: [reformat.mpr]}
      - {name: not-volume, match: {IsVolume: false}, select_series: {prefer: all}, run: [reformat.mpr]}
    """)  # fmt: skip

# series of the study, in order: SeriesNumber 201 + index
CLASSIC_CT, CLASSIC_MR, ENH_MR, ENH_CT, B0_MAP, HEAD_CT, ONE_IMAGE = range(7)
EXPECTED = {  # rule -> indices of the series it runs on
    "study-uid": {0, 1, 2, 3, 4, 5, 6},
    "series-uid": {ENH_MR},
    "sop-class": {ENH_MR, B0_MAP},
    "modality": {CLASSIC_CT, ENH_CT, HEAD_CT},
    "study-date": {ENH_MR, B0_MAP},
    "accession": {0, 1, 2, 3, 4, 5, 6},
    "study-description": {CLASSIC_CT, ENH_CT},
    "series-description": {ENH_MR},
    "series-number": {HEAD_CT, ONE_IMAGE},
    "protocol": {CLASSIC_MR},
    "body-part": {CLASSIC_CT, ENH_CT, HEAD_CT},
    "patient-position": {B0_MAP},  # most images: its 64 frames
    "image-type": {ENH_MR, ONE_IMAGE},
    "thin": {CLASSIC_MR},
    "spacing-between": {ENH_MR, B0_MAP, ONE_IMAGE},
    "pixel-spacing": {CLASSIC_CT, ENH_CT},
    "rows": {CLASSIC_CT},  # thinnest: 3 mm like ENH_CT, more images
    "columns": {ENH_MR, B0_MAP},
    "frames": {ENH_MR, ENH_CT, B0_MAP},
    "kernel": {CLASSIC_CT, ENH_CT},
    "kernel-ge": {HEAD_CT},
    "contrast": {CLASSIC_CT},
    "frame-of-reference": {ENH_MR, B0_MAP},
    "institution": {ENH_MR, B0_MAP},
    "station": {ONE_IMAGE},
    "manufacturer": {CLASSIC_MR, HEAD_CT},
    "model": {CLASSIC_CT, ENH_CT},
    "instances": {CLASSIC_CT, CLASSIC_MR, HEAD_CT},
    "images": {CLASSIC_CT, ENH_MR, ENH_CT, B0_MAP},
    "volume": {CLASSIC_MR, ENH_MR},
    "not-volume": {B0_MAP, ONE_IMAGE},
}


def _contrast(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds = pydicom.dcmread(ds.filename)  # a private copy of the cached slice
    ds.ContrastBolusAgent = "IOMEPROL 350"
    return ds


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The test study: classic and enhanced CT and MR, a two-stack map, a single image."""
    ct = rk.images(rk.CT)
    enh_ct = rk.enhanced_ct()
    enh_ct.BodyPartExamined = "CHEST"
    series = [
        [_contrast(d) for d in ct[:40]],
        rk.images(rk.MR_3D)[:25],
        [rk.enhanced_mr_one_stack()],
        [enh_ct],
        [pydicom.dcmread(rk.B0_MAP)],
        rk.images(rk.HEAD_CT),
        rk.images(rk.ONE_MR_IMAGE)[:1],
    ]
    folder = tmp_path_factory.mktemp("study")
    uid, paths = rk.write_study(series, folder, "same")
    return uid, folder, paths


def _by_number(rows: list[dict]) -> dict[int, dict]:
    return {int(r["SeriesNumber"]) - 201: r for r in rows}


def _through_listener(paths, tmp_path) -> FolderArchive:
    """Send the study to ``sprim listen``'s C-STORE SCP; its store, as jobs read it."""
    from pynetdicom import AE

    from workers.ingest.listener import Listener, ListenerStore

    files = [p for ps in paths for p in ps]
    ae = AE("MODALITY")
    for cx in {pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID for p in files}:
        ae.add_requested_context(cx, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    store = ListenerStore(tmp_path / "listener")
    with Listener(store, port=0, allowed_aets=["MODALITY"]) as lst:
        assoc = ae.associate("127.0.0.1", lst.port, ae_title="SPRIM")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(p).Status) for p in files]
        assoc.release()
    assert statuses == [0] * len(files)
    return FolderArchive(store.root, name="listen:SPRIM")


def _picked(ruleset, rows) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {r.name: set() for r in ruleset.rules}
    for m in route(ruleset, rows):
        out[m.rule.name].add(int(m.series["SeriesNumber"]) - 201)
    return out


def test_rules_on_every_keyword_fire_alike_from_folder_listener_store_and_orthanc(
    study, orthanc, tmp_path
):
    uid, folder, paths = study
    rules = load_rules(EVERY_KEYWORD, name="every-keyword.yaml")
    touched = {c.key for r in rules.rules for c in r.match + r.where}
    assert touched == set(ROUTING_KEYWORDS)

    run_rows = [s.attributes for s in scan(folder)]  # sprim run / rules explain
    folder_rows = FolderArchive(folder).series_of_study(uid)  # the embedded archive
    store_rows = _through_listener(paths, tmp_path).series_of_study(uid)
    web = DicomWebArchive(orthanc.dicomweb_url)
    web.store([p for ps in paths for p in ps])  # STOW-RS: storescu lacks the enhanced classes
    web_rows = web.series_of_study(uid)

    assert len(run_rows) == len(folder_rows) == len(store_rows) == len(web_rows) == 7
    assert _by_number(folder_rows) == _by_number(run_rows)
    assert _by_number(store_rows) == _by_number(run_rows)
    assert _by_number(web_rows) == _by_number(run_rows)
    for rows in (run_rows, folder_rows, store_rows, web_rows):
        assert _picked(rules, rows) == EXPECTED
    # explain agrees too, reason by reason

    def why(rows):
        return [
            sorted((s.series_uid, s.status, s.reason) for s in v.series)
            for v in explain(rules, rows)
        ]

    assert why(web_rows) == why(folder_rows) == why(run_rows)


def test_derived_attributes_count_images_and_tell_volumes(study):
    _, folder, _ = study
    rows = _by_number([s.attributes for s in scan(folder)])
    got = {
        i: (r["NumberOfSeriesRelatedInstances"], r["NumberOfImages"], r["IsVolume"])
        for i, r in rows.items()
    }
    assert got == {
        CLASSIC_CT: (40, 40, True),
        CLASSIC_MR: (25, 25, True),
        ENH_MR: (1, 32, True),
        ENH_CT: (1, 30, True),
        B0_MAP: (1, 64, False),  # magnitude and field map at the same 32 positions
        HEAD_CT: (28, 28, True),  # gantry tilt and uneven spacing: still one stack
        ONE_IMAGE: (1, 1, False),
    }
    assert rows[ENH_CT]["ConvolutionKernel"] == "B"  # from its functional groups
    assert rows[ENH_MR]["PixelSpacing"] == [4.0, 4.0]
    assert "NumberOfFrames" not in rows[CLASSIC_CT]


def test_default_rules_process_enhanced_volumes_from_folder_and_orthanc(tmp_path, orthanc, dcmtk):
    enh_ct = rk.enhanced_ct()
    enh_ct.BodyPartExamined = "CHEST"
    uid, paths = rk.write_study(
        [[rk.enhanced_mr_one_stack()], [enh_ct], [pydicom.dcmread(rk.B0_MAP)]], tmp_path, "enh"
    )
    rules = load_rules_file(DEFAULT_RULES)
    web = DicomWebArchive(orthanc.dicomweb_url)
    web.store([p for ps in paths for p in ps])
    expected = {
        "ct-volume-mpr": {1},
        "ct-chest-lungs": {1},
        "ct-bone-3d": {1},
        "mr-volume-mpr": {0},  # not the two-stack B0 map
    }
    for rows in (
        [s.attributes for s in scan(tmp_path)],
        web.series_of_study(uid),
    ):
        assert _picked(rules, rows) == expected


def test_rules_loader_refuses_keywords_outside_the_routing_set():
    from pipelines.rules import RulesError

    text = EVERY_KEYWORD.replace("ManufacturerModelName", "PatientAge")
    with pytest.raises(RulesError) as e:
        load_rules(text, name="site.yaml")
    msg = str(e.value)
    assert msg.startswith(
        "site.yaml:28: rule model: match: 'PatientAge' is not a routing attribute"
    )
    assert ("rules may test: " + ", ".join(ROUTING_KEYWORDS)) in msg
    assert msg.endswith("calling_ae, source, institution")


@pytest.fixture
def enhanced_mr_study(tmp_path):
    """An enhanced 3D MR (one file, 32 frames) and a two-stack B0 map, as one study."""
    uid, paths = rk.write_study(
        [[rk.enhanced_mr_one_stack()], [pydicom.dcmread(rk.B0_MAP)]], tmp_path / "in", "enh-mr"
    )
    return uid, paths


def _planes(series_descriptions) -> set[str]:
    return {d.split()[0] for d in series_descriptions}


def test_sprim_run_reformats_an_enhanced_3d_mr_with_the_default_rules(enhanced_mr_study, tmp_path):
    from workers.processing.offline import plan_rules, run

    summary = run([tmp_path / "in"], tmp_path / "out", plan_fn=plan_rules(None))
    [job] = summary.jobs
    assert (job.rule, job.state, job.series_description) == (
        "mr-volume-mpr", "done", "201 T1 3D (magnitude)"
    )  # fmt: skip
    outputs = [o for s in job.steps for o in s["outputs"]]
    assert _planes(o["series_description"] for o in outputs) == {"AX", "COR", "SAG"}
    for o in {o["series_uid"]: o for o in outputs}.values():  # one file of each output series
        assert dciodvfy_errors(o["path"]) == [], o["series_description"]
    [skipped] = summary.unmatched
    assert skipped["series"] == "MR 202 B0 NS"
    assert "mr-volume-mpr: select_series.where: IsVolume: False != True" in skipped["reason"]


def test_an_enhanced_3d_mr_in_orthanc_is_routed_fetched_reformatted_and_stored(
    enhanced_mr_study, orthanc, tmp_path
):
    from workers.processing.runner import StepCall, run_steps
    from workers.reading.series import read_series

    uid, paths = enhanced_mr_study
    web = DicomWebArchive(orthanc.dicomweb_url)
    web.store([p for ps in paths for p in ps])
    [m] = route(load_rules_file(DEFAULT_RULES), web.series_of_study(uid))
    assert (m.rule.name, m.series["NumberOfImages"]) == ("mr-volume-mpr", 32)
    files = web.fetch_series(uid, m.series_uid, tmp_path / "job" / "in")
    assert len(files) == 1
    [series] = scan(tmp_path / "job" / "in")
    source = read_series(series)
    assert source.volume.image.GetSize()[2] == 32
    calls = [StepCall(r.step, r.params) for r in m.steps]
    report = run_steps(source, calls, m.rule.name, tmp_path / "job" / "out")
    assert report.complete, report.failures
    web.store([w.path for w in report.written])
    stored = {s["SeriesInstanceUID"]: s for s in web.series_of_study(uid)}
    made = {w.series_uid for w in report.written}
    assert made <= set(stored) and len(made) == 3
    assert _planes(stored[u]["SeriesDescription"] for u in made) == {"AX", "COR", "SAG"}


def test_an_oddly_encoded_metadata_value_is_left_out_not_fatal(caplog):
    from workers.archives.dicomweb import _FIRST_IMAGE_TAGS, _header

    ds = _header(
        {
            "00200013": {"vr": "IS", "Value": ["x1"]},  # InstanceNumber not a number
            "00080060": {"vr": "CS", "Value": ["CT"]},
            "00280030": {"vr": "DS", "Value": [0.5, 0.5]},
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Not^Kept"}]},  # not routing
        },
        _FIRST_IMAGE_TAGS,
    )
    assert [e.keyword for e in ds] == ["Modality", "PixelSpacing"]
    assert "tag=00200013" in caplog.text


def test_sprim_run_gives_an_enhanced_ct_every_default_ct_output(tmp_path):
    from workers.processing.offline import plan_rules, run

    enh_ct = rk.enhanced_ct()
    enh_ct.BodyPartExamined = "CHEST"
    rk.write_study([[enh_ct]], tmp_path / "in", "enh-ct")
    summary = run([tmp_path / "in"], tmp_path / "out", plan_fn=plan_rules(None))
    assert {(j.rule, j.state) for j in summary.jobs} == {
        ("ct-volume-mpr", "done"), ("ct-chest-lungs", "done"), ("ct-bone-3d", "done")
    }  # fmt: skip
    outputs = {o["series_uid"]: o for j in summary.jobs for s in j.steps for o in s["outputs"]}
    kinds = sorted(o["series_description"].split(" [")[0] for o in outputs.values())
    assert kinds == [
        "AX 3mm AVG", "COR 3mm AVG", "MIP 36x10deg", "SAG 3mm AVG", "SEG Body", "SEG Bone",
        "SEG Lungs", "SR volumes Body", "SR volumes Bone", "SR volumes Lungs", "STL 3D Bone",
        "STL 3D Lungs",
    ]  # fmt: skip
    for o in outputs.values():
        assert dciodvfy_errors(o["path"]) == [], o["series_description"]
