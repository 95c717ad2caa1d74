"""Web console over HTTP (SQLite and PostgreSQL job stores): login, institution isolation, CSRF,
the reprocess form generated from a step's params model and validated by the API's code, the
failures page's actions, rules and explain, load per institution, escaped DICOM strings.

The same flows in a real browser against `sprim serve`: tests/workers/test_console_browser.py.
"""

from __future__ import annotations

import re
import time

import pytest
from fastapi.testclient import TestClient

from tests.platform_kit import write_study

HOSTILE_DESC = '<img src=x onerror="window.__pwned=1">AX'
HOSTILE_SITE = 'SITE "C"<script>window.__pwned=2</script>'
HOSTILE_PATIENT = "<script>alert(3)</script>^EVIL"


@pytest.fixture
def app(sprim_env, store_url):
    from workers.interfaces.api import create_app
    from workers.platform.jobstore import open_store

    return create_app(open_store(store_url))


def _client(app) -> TestClient:
    return TestClient(app, raise_server_exceptions=False, follow_redirects=False)


def login(app, token: str) -> TestClient:
    c = _client(app)
    r = c.post("/console/login", data={"token": token, "next": "/console/jobs"})
    assert r.status_code == 303, r.text
    return c


def csrf(c: TestClient, path: str = "/console/failures") -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', c.get(path).text)
    assert m, "no CSRF token on the page"
    return m.group(1)


@pytest.fixture
def sites(sprim_env):
    """One processed study per institution: {"A": (study, series, job id), "B": (...)}."""
    from workers.archives.folder import FolderArchive
    from workers.platform import submission
    from workers.platform.jobstore import open_store

    archive = FolderArchive(sprim_env / "archive", name="local")
    out = {}
    for site in ("A", "B"):
        st, se = write_study(
            sprim_env / "archive" / f"in-{site}",
            institution=f"SITE {site}",
            series_description=f"SERIES OF SITE {site}",
        )
        [j] = submission.submit_study(st, archive, {})
        assert open_store().get(j.id).state == "done", open_store().get(j.id).error
        out[site] = (st, se, j.id)
    return out


def test_login_session_cookie_and_logout(app, sites):
    c = _client(app)
    r = c.get("/console/jobs?state=done")
    assert r.status_code == 303
    assert r.headers["location"] == "/console/login?next=%2Fconsole%2Fjobs%3Fstate%3Ddone"
    assert c.get("/").headers["location"] == "/console/jobs"
    r = c.post("/console/login", data={"token": "nope", "next": "/console/jobs"})
    assert r.status_code == 401 and "unknown token" in r.text and "set-cookie" not in r.headers
    # never redirected off the console after login
    r = c.post("/console/login", data={"token": "tok-a", "next": "//evil.example/x"})
    assert r.status_code == 303 and r.headers["location"] == "/console/jobs"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "tok-a" not in cookie  # the session holds a digest of the token, not the token
    page = c.get("/console/jobs")
    assert page.status_code == 200 and f"job-{sites['A'][2]}" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    # a forged or tampered session is no session
    c2 = _client(app)
    c2.cookies.set("sprim_session", c.cookies["sprim_session"][:-3] + "AAA", path="/console")
    assert c2.get("/console/jobs").status_code == 303
    assert c.post("/console/logout", data={}).status_code == 403  # CSRF token required
    r = c.post("/console/logout", data={"csrf": csrf(c)})
    assert r.status_code == 303 and 'sprim_session=""' in r.headers["set-cookie"]


def test_a_token_removed_from_the_table_ends_its_sessions(app, sites, monkeypatch):
    from workers.core.config import settings

    c = login(app, "tok-a")
    assert c.get("/console/jobs").status_code == 200
    monkeypatch.setenv("SPRIM_API_TOKENS", '{"tok-b": "SITE B"}')
    settings.cache_clear()
    assert c.get("/console/jobs").status_code == 303
    monkeypatch.setenv("SPRIM_API_TOKENS", "")
    settings.cache_clear()
    assert "no tokens are configured: set SPRIM_API_TOKENS" in c.get("/console/login").text


def test_a_token_sees_only_its_institution_everywhere(app, sites, sprim_env):
    st_a, se_a, job_a = sites["A"]
    st_b, se_b, job_b = sites["B"]
    a, b, admin = login(app, "tok-a"), login(app, "tok-b"), login(app, "tok-admin")
    pages = ["/console/jobs", "/console/jobs?state=done", "/console/failures", "/console/load",
             "/console/rules", "/console/fragments/jobs", "/console/fragments/load"]  # fmt: skip
    for path in pages:
        text = b.get(path).text
        assert st_a not in text and "SITE A" not in text, path
        assert b.get(path).status_code == 200
    assert st_b in b.get("/console/jobs").text
    admin_jobs = admin.get("/console/jobs").text
    assert st_a in admin_jobs and st_b in admin_jobs and "SITE A" in admin_jobs
    assert (
        "SITE A" in admin.get("/console/load").text and "SITE B" in admin.get("/console/load").text
    )
    # another institution's study, job, preview, explain: the same 404 as a missing one
    for path_b, missing in [
        (f"/console/studies/{st_b}", "/console/studies/1.2.3.999"),
        (f"/console/fragments/studies/{st_b}/jobs", "/console/fragments/studies/1.2.3.999/jobs"),
        (f"/console/rules?study={st_b}", "/console/rules?study=1.2.3.999"),
        (f"/console/jobs/{job_b}/previews/x.jpg", f"/console/jobs/{2**31 - 1}/previews/x.jpg"),
        (f"/console/jobs/{job_b}", f"/console/jobs/{2**31 - 1}"),
    ]:
        r, m = a.get(path_b), a.get(missing)
        assert r.status_code == m.status_code == 404, (path_b, r.status_code)
        assert se_b not in r.text and "SITE B" not in r.text and "SERIES OF SITE B" not in r.text
        ids = re.compile(r"[0-9.]+")
        assert ids.sub("#", r.text) == ids.sub("#", m.text)
    # and no action on it either
    tok = csrf(a)
    for path in (f"/console/jobs/{job_b}/retry", f"/console/jobs/{job_b}/cancel"):
        assert a.post(path, data={"csrf": tok}).status_code == 404
    r = a.post(f"/console/studies/{st_b}/reprocess",
               data={"csrf": tok, "step": "test.touch", "p.label": "X"})  # fmt: skip
    assert r.status_code == 404 and "SITE B" not in r.text
    from workers.platform.jobstore import open_store

    assert len(open_store().list(study_uid=st_b)) == 1  # nothing was queued
    assert "SERIES OF SITE A" in a.get(f"/console/studies/{st_a}").text
    assert (
        a.get(f"/console/jobs/{job_a}").headers["location"]
        == f"/console/studies/{st_a}#job-{job_a}"
    )


def test_state_changes_need_the_sessions_csrf_token(app, sites):
    from workers.platform.jobstore import open_store

    st_a, _se, job_a = sites["A"]
    a, a2 = login(app, "tok-a"), login(app, "tok-a")
    other_session = csrf(a2)
    form = {"step": "test.touch", "p.label": "CSRF"}
    for data in ({}, {"csrf": "x" * 32}):
        assert (
            a.post(f"/console/studies/{st_a}/reprocess", data={**form, **data}).status_code == 403
        )
        assert a.post(f"/console/jobs/{job_a}/cancel", data=data).status_code == 403
    # a token is bound to its session (another login of the same token has its own)
    r = a.post(f"/console/studies/{st_a}/reprocess", data={**form, "csrf": other_session})
    assert r.status_code == 403
    # from another site's page: refused even with the right token
    r = a.post(f"/console/studies/{st_a}/reprocess", data={**form, "csrf": csrf(a)},
               headers={"Origin": "http://evil.example"})  # fmt: skip
    assert r.status_code == 403
    r = a.post("/console/login", data={"token": "tok-a"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert len(open_store().list(study_uid=st_a)) == 1  # nothing was queued


def test_reprocess_form_from_the_params_model_and_server_side_validation(app, sites):
    from workers.platform.jobstore import open_store

    st_a, se_a, job_a = sites["A"]
    a = login(app, "tok-a")
    page = a.get(f"/console/studies/{st_a}").text
    form = page[page.index('id="reprocess-test.touch"') :]
    form = form[: form.index("</form>")]
    # inputs, bounds, defaults and meanings come from TouchParams
    assert re.search(r'name="p.sleep_s" type="number"[^>]*min="0.0"', form)
    assert 'name="p.label" type="text" value="TOUCH"' in form  # the value the rule ran with
    assert "<td>TEST</td>" in form  # the model's default
    assert re.search(r'<select id="[^"]+-fail" name="p.fail">', form)
    assert "Seconds to sleep (simulates work)." in form and "[0, inf)" in form
    tok = csrf(a, f"/console/studies/{st_a}")
    # invalid: the API's validation, the message next to the field, the typed value kept
    r = a.post(f"/console/studies/{st_a}/reprocess", data={
        "csrf": tok, "step": "test.touch", "series_uid": se_a, "priority": "urgent",
        "p.sleep_s": "-1", "p.label": "TOUCH", "p.fail": "false",
    })  # fmt: skip
    assert r.status_code == 422
    row = r.text[r.text.index('for="test.touch-sleep_s"') :]
    row = row[: row.index("</tr>")]
    assert 'value="-1"' in row and "greater than or equal to 0" in row
    assert 'class="field-error"' in row
    r = a.post(f"/console/studies/{st_a}/reprocess", data={
        "csrf": tok, "step": "test.touch", "series_uid": se_a, "p.sleep_s": "abc"})  # fmt: skip
    assert r.status_code == 422 and "valid number" in r.text
    assert len(open_store().list(study_uid=st_a)) == 1
    # a changed param: only it is sent; a new series named after the change
    r = a.post(f"/console/studies/{st_a}/reprocess", data={
        "csrf": tok, "step": "test.touch", "series_uid": se_a, "priority": "normal",
        "p.sleep_s": "0", "p.label": "THICK", "p.fail": "false", "p.crash": "false",
        "p.alloc_mb": "0",
    })  # fmt: skip
    assert r.status_code == 303, r.text
    new_id = int(re.search(r"queued-(\d+)", r.headers["location"]).group(1))
    job = open_store().get(new_id)
    assert job.state == "done" and job.requester == "console@SITE A" and job.priority == 1
    assert job.description_suffix == "[label=THICK]"
    assert job.steps[0]["with"]["label"] == "THICK"
    page = a.get(r.headers["location"]).text
    assert f"job {new_id} queued" in page and "THICK [label=THICK]" in page
    # the audit trail names the console and the institution
    assert "console@SITE A" in page


def test_param_fields_of_a_real_step_carry_units_bounds_and_choices():
    from pipelines import get_step
    from workers.interfaces.console import changed_params, param_fields

    st = get_step("reformat.mpr")
    current = st.validate({"planes": ["coronal"], "thickness_mm": 3}).model_dump(mode="json")
    fields = {f.name: f for f in param_fields(st.params, current)}
    t = fields["thickness_mm"]
    assert (t.kind, t.unit, t.minimum, t.maximum, t.default, t.value, t.bounds) == (
        "number", "mm", 0.1, 500.0, "3", "3", "[0.1, 500]")  # fmt: skip
    assert fields["spacing_mm"].optional and fields["spacing_mm"].value == ""
    assert fields["mode"].kind == "choice" and fields["mode"].options == ["AVG", "MIP", "MinIP"]
    assert fields["planes"].kind == "choices" and fields["planes"].value == ["coronal"]
    assert fields["preset"].kind == "choice" and "COR 3mm" in fields["preset"].options
    form = {"p.thickness_mm": ["5"], "p.mode": ["AVG"], "p.spacing_mm": [""], "has.planes": ["1"],
            "p.planes": ["coronal"]}  # fmt: skip
    assert changed_params(list(fields.values()), form) == {"thickness_mm": "5"}
    form["p.planes"] = ["coronal", "axial"]
    assert changed_params(list(fields.values()), form)["planes"] == ["coronal", "axial"]


def test_failures_page_retry_and_cancel(app, sites):
    from workers.platform.jobstore import open_store

    st_a, se_a, job_a = sites["A"]
    a = login(app, "tok-a")
    tok = csrf(a, f"/console/studies/{st_a}")
    r = a.post(f"/console/studies/{st_a}/reprocess", data={
        "csrf": tok, "step": "test.touch", "series_uid": se_a, "p.fail": "true"})  # fmt: skip
    failed_id = int(re.search(r"queued-(\d+)", r.headers["location"]).group(1))
    page = a.get("/console/failures").text
    assert f'id="job-{failed_id}"' in page and "refused on purpose (test)" in page
    assert f'action="/console/jobs/{failed_id}/retry"' in page
    r = a.post(f"/console/jobs/{failed_id}/retry", data={"csrf": tok, "next": "/console/failures"})
    assert (
        r.status_code == 303
        and r.headers["location"] == f"/console/failures?ok=retried-{failed_id}"
    )
    assert f"job {failed_id} retried" in a.get(r.headers["location"]).text
    job = open_store().get(failed_id)
    assert job.state == "failed" and job.attempts == 1  # ran again, failed again
    trail = [(x.event, x.to_state, x.actor) for x in open_store().audit_trail(job_id=failed_id)]
    assert ("state", "queued", "console:SITE A") in trail
    # a done job cannot be cancelled: the reason is shown, nothing changes
    r = a.post(f"/console/jobs/{job_a}/cancel", data={"csrf": tok})
    assert r.status_code == 409 and "only queued or running jobs can be cancelled" in r.text
    assert open_store().get(job_a).state == "done"


def test_cancel_a_job_waiting_to_retry(app, sites):
    from workers.platform.jobstore import open_store

    st_a, se_a, job_a = sites["A"]
    store = open_store()
    waiting = store.create_job(
        rule="touch", study_uid=st_a, series_uid=se_a, institution="SITE A", steps=[],
        not_before=time.time() + 300, error="archive transient error: 503 from the archive",
    )  # fmt: skip
    a = login(app, "tok-a")
    page = a.get("/console/failures").text
    assert "archive transient error: 503" in page
    assert f'action="/console/jobs/{waiting.id}/cancel"' in page
    r = a.post(f"/console/jobs/{waiting.id}/cancel", data={"csrf": csrf(a)})
    assert r.status_code == 303
    assert store.get(waiting.id).state == "cancelled"


def test_rules_page_and_explain(app, sites):
    st_a = sites["A"][0]
    a = login(app, "tok-a")
    page = a.get("/console/rules").text
    assert 'id="rule-touch"' in page and "Modality in [&#39;CT&#39;]" in page
    assert "test.touch" in page and "label=TOUCH" in page
    page = a.get(f"/console/rules?study={st_a}").text
    assert "touch: <span" in page and "matched" in page and "picked" in page
    assert "SERIES OF SITE A" in page


def test_rules_naming_another_institution_are_not_shown_to_a_site(app, sites, sprim_env):
    from tests.workers.conftest import RULES

    other = """
  - name: only-site-b
    match: {institution: {in: [SITE B]}, Modality: {in: [CT]}}
    run:
      - {use: test.touch, with: {label: SITEB}}
"""
    (sprim_env / "rules.yaml").write_text(RULES + other)  # hot reload
    a, b, admin = login(app, "tok-a"), login(app, "tok-b"), login(app, "tok-admin")
    page_a = a.get("/console/rules").text
    assert 'id="rule-touch"' in page_a and "only-site-b" not in page_a and "SITE B" not in page_a
    assert "rules.yaml" not in page_a  # the server's file path is for the "*" token
    assert 'id="rule-only-site-b"' in b.get("/console/rules").text
    assert 'id="rule-only-site-b"' in admin.get("/console/rules").text
    assert "only-site-b" not in a.get(f"/console/rules?study={sites['A'][0]}").text


def test_load_per_institution(app, sites):
    from workers.platform.jobstore import open_store

    store = open_store()
    st_a, se_a, _ = sites["A"]
    store.create_job(rule="touch", study_uid=st_a, series_uid=se_a, institution="SITE A", steps=[])
    admin = login(app, "tok-admin")
    from workers.interfaces.console import Session, load_by_institution

    rows = {r["institution"]: r for r in load_by_institution(store, Session("*", ""))}
    assert rows["SITE A"]["queued"] == 1 and rows["SITE A"]["done"] == 1
    assert rows["SITE B"]["queued"] == 0 and rows["SITE B"]["done"] == 1
    assert 0 < rows["SITE A"]["median_turnaround"] < 120
    page = admin.get("/console/load").text
    assert page.count("<tr>") == 1 + 2  # header + two institutions
    only_a = {r["institution"] for r in load_by_institution(store, Session("SITE A", ""))}
    assert only_a == {"SITE A"}


def test_jobs_filters(app, sites):
    st_a, se_a, job_a = sites["A"]
    admin = login(app, "tok-admin")
    assert st_a in admin.get("/console/jobs?institution=SITE+A").text
    assert st_a not in admin.get("/console/jobs?institution=SITE+B").text
    assert st_a in admin.get("/console/jobs?rule=touch&state=done&since=1h").text
    assert st_a not in admin.get("/console/jobs?state=failed").text
    assert st_a not in admin.get("/console/jobs?rule=other").text
    # a token bound to an institution cannot widen its filter
    a = login(app, "tok-a")
    assert sites["B"][0] not in a.get("/console/jobs?institution=SITE+B").text
    page = admin.get("/console/jobs").text
    assert 'data-refresh="/console/fragments/jobs?"' in page
    assert "data-refresh" not in admin.get("/console/jobs?refresh=0").text


def test_every_dicom_string_is_escaped(app, sprim_env):
    """Hostile SeriesDescription, InstitutionName and PatientName: shown as text, never markup
    (PatientName is not even kept by the job store)."""
    import pydicom

    from workers.archives.folder import FolderArchive
    from workers.platform import submission

    folder = sprim_env / "archive" / "hostile"
    st, se = write_study(folder, institution=HOSTILE_SITE, series_description=HOSTILE_DESC)
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.PatientName = HOSTILE_PATIENT
        ds.save_as(f)
    [j] = submission.submit_study(st, FolderArchive(sprim_env / "archive", name="local"), {})
    admin = login(app, "tok-admin")
    for path in (f"/console/studies/{st}", "/console/jobs", f"/console/rules?study={st}",
                 "/console/load", f"/console/fragments/studies/{st}/jobs"):  # fmt: skip
        text = admin.get(path).text
        assert "<script>window" not in text and "<img src=x" not in text, path
        assert "alert(3)" not in text and "EVIL" not in text, path
    page = admin.get(f"/console/studies/{st}").text
    assert "&lt;img src=x onerror=&#34;window.__pwned=1&#34;&gt;AX" in page
    assert "SITE &#34;C&#34;&lt;script&gt;window.__pwned=2&lt;/script&gt;" in page


def test_store_unreachable_is_one_line(sprim_env):
    from workers.interfaces.api import create_app
    from workers.platform.jobstore import JobStore

    down = JobStore("postgresql+psycopg://root@127.0.0.1:9/nowhere")
    app = create_app(down)
    c = login(app, "tok-a")
    r = c.get("/console/jobs")
    assert r.status_code == 503 and "job store unreachable at postgresql" in r.text


def test_previews_are_served_only_to_the_jobs_institution(app, sites):
    import io

    from PIL import Image

    from workers.platform.jobstore import open_store

    st_a, _se, job_a = sites["A"]
    store = open_store()
    [out] = store.get(job_a).outputs
    [rec] = out["previews"]  # made by the runner, kept by the executor
    a, b = login(app, "tok-a"), login(app, "tok-b")
    url = f"/console/jobs/{job_a}/previews/{rec['path']}"
    assert f'src="{url}"' in a.get(f"/console/studies/{st_a}").text
    r = a.get(url)
    assert r.status_code == 200 and r.headers["content-type"] in ("image/jpeg", "image/webp")
    assert "private" in r.headers["cache-control"]
    assert Image.open(io.BytesIO(r.content)).size[0] > 0
    assert b.get(url).status_code == 404 and _client(app).get(url).status_code == 303
    assert a.get(f"/console/jobs/{job_a}/previews/other.jpg").status_code == 404
    # a record naming a file outside the job's previews folder is never served
    for bad in ("../../jobs.db", "/etc/passwd", "../job-1/x.jpg"):
        store.transition(job_a, "done", expect=("done",),
                         outputs=[{**out, "previews": [{**rec, "path": bad}]}])  # fmt: skip
        name = bad.rsplit("/", 1)[-1]
        assert a.get(f"/console/jobs/{job_a}/previews/{name}").status_code == 404
    page = a.get(f"/console/studies/{st_a}").text
    assert "preview file not found" in page
