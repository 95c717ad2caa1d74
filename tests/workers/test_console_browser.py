"""The web console in headless Chromium against a real `sprim serve` (its own port, SPRIM_HOME and
job store; SQLite and PostgreSQL; the embedded dispatcher runs jobs in the server process).

Log in with a token, see the finished job, open its study with previews decoded, reprocess with
a changed param and watch the new job and its output appear; a token of another institution
sees none of it. Screenshots: .sprim/artifacts/screenshots/console-*.png.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request

import pydicom
import pytest

from tests.platform_kit import ROOT, VENV_BIN, free_port

RULES = """
rules:
  - name: ct-coronal
    trigger: {quiet_period: 0s}
    match: {Modality: {in: [CT]}}
    select_series:
      where: {IsVolume: true}
      prefer: thinnest
    run:
      - {use: reformat.mpr, with: {planes: [coronal], thickness_mm: 3}}
"""
HOSTILE_DESC = '<img src=x onerror="window.__pwned=1">CHEST 1.5mm'
HOSTILE_PATIENT = "<script>window.__pwned=2</script>^EVIL"


@pytest.fixture
def study(sprim_env):
    """A chest CT phantom of SITE A (hostile SeriesDescription and PatientName), processed by
    the rule above through the real job path; returns (study UID, job id)."""
    from pipelines.testing import chest_ct
    from workers.archives.folder import FolderArchive
    from workers.platform import submission
    from workers.processing.testing import write_source_series

    (sprim_env / "rules.yaml").write_text(RULES)  # SPRIM_RULES_FILE (hot reload)
    folder = sprim_env / "archive" / "chest"
    files = write_source_series(chest_ct(n_slices=40, size=96).volume, folder, body_part="CHEST")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.InstitutionName, ds.SeriesDescription = "SITE A", HOSTILE_DESC
        ds.PatientName = HOSTILE_PATIENT
        ds.save_as(f)
    st = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    [job] = submission.submit_study(st, FolderArchive(sprim_env / "archive", name="local"), {})
    from workers.platform.jobstore import open_store

    job = open_store().get(job.id)
    assert job.state == "done", job.error
    return st, job.id


@pytest.fixture
def server(sprim_env, study):
    """`sprim serve` on a free port with this test's environment; its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SPRIM_BROKER_URL"}
    env["PYTHONPATH"] = str(ROOT)  # SPRIM_PLUGINS=tests.platform_kit
    log = open(sprim_env / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(VENV_BIN / "sprim"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=sprim_env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (sprim_env / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "sprim serve did not answer within 60 s"
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _login(browser, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    browser.open(f"{url}/console/jobs")
    assert "/console/login" in browser.driver.current_url
    browser.driver.find_element(By.ID, "token").send_keys(token)
    browser.driver.find_element(By.CSS_SELECTOR, "form.login button").click()
    browser.wait_for("return location.pathname === '/console/jobs'")


def _logout(browser) -> None:
    from selenium.webdriver.common.by import By

    browser.driver.find_element(By.CSS_SELECTOR, "header form button").click()
    browser.wait_for("return location.pathname === '/console/login'")


def _wait(browser, script: str, timeout: float | None = None) -> None:
    """``browser.wait_for``; on time-out, fail with what the page shows."""
    from selenium.common.exceptions import TimeoutException

    try:
        browser.wait_for(script, timeout)
    except TimeoutException:
        pytest.fail(
            f"waited for: {script}\npage {browser.driver.current_url}:\n{browser.text()[:3000]}"
        )


def _decoded(browser) -> list[dict]:
    imgs = [i for i in browser.images() if "/previews/" in i["src"]]
    assert imgs, "no preview <img> on the page"
    assert all(i["naturalWidth"] > 0 and i["naturalHeight"] > 0 for i in imgs), imgs
    return imgs


def test_console_flows_in_a_real_browser(browser, server, study, sprim_env, store_url):
    from selenium.webdriver.common.by import By

    st, job_id = study
    tag = "sqlite" if store_url.startswith("sqlite") else "postgresql"
    _login(browser, server, "tok-a")
    row = browser.driver.find_element(By.ID, f"job-{job_id}")
    assert "done" in row.text and "ct-coronal" in row.text and st in row.text
    browser.screenshot(f"console-jobs-{tag}")

    # the study: its source series (the hostile description as text), the output's previews
    row.find_element(By.LINK_TEXT, st).click()
    browser.wait_for(f"return location.pathname === '/console/studies/{st}'")
    text = browser.text()
    assert HOSTILE_DESC in text and "COR 3mm" in text and "reformat.mpr" in text
    assert "EVIL" not in text  # PatientName is not kept at all
    assert browser.driver.execute_script("return window.__pwned === undefined")
    before = _decoded(browser)
    browser.screenshot(f"console-study-{tag}")

    # reprocess: thickness 3 -> 5 mm; the job appears and runs in the server process
    thickness = browser.driver.find_element(By.ID, "reformat.mpr-thickness_mm")
    assert thickness.get_attribute("value") == "3" and thickness.get_attribute("min") == "0.1"
    thickness.clear()
    thickness.send_keys("5")
    browser.driver.find_element(
        By.CSS_SELECTOR, "#reprocess-reformat\\.mpr button[type=submit]"
    ).click()
    browser.wait_for("return location.search.includes('ok=queued-')")
    new_id = int(re.search(r"queued-(\d+)", browser.driver.current_url).group(1))
    assert new_id != job_id
    assert f"job {new_id} queued" in browser.text()
    assert browser.driver.find_element(By.ID, f"job-{new_id}")  # listed at once
    # the table refreshes in place; the page reloads when the job is over
    _wait(
        browser,
        f"var r = document.getElementById('job-{new_id}');"
        "return r && r.querySelector('.state').textContent === 'done'"
        " && document.body.innerText.includes('[thickness_mm=5]')",
        timeout=120,
    )
    browser.wait_for("return document.readyState === 'complete'")
    assert "COR 5mm" in browser.text()
    after = _decoded(browser)
    assert len(after) > len(before)
    browser.screenshot(f"console-reprocessed-{tag}")

    # a bad value is refused next to its field, nothing queued
    thickness = browser.driver.find_element(By.ID, "reformat.mpr-thickness_mm")
    thickness.clear()
    thickness.send_keys("0.01")
    browser.driver.find_element(
        By.CSS_SELECTOR, "#reprocess-reformat\\.mpr button[type=submit]"
    ).click()
    _wait(browser, "return document.querySelector('.field-error') !== null")
    err = browser.driver.find_element(By.CSS_SELECTOR, "tr.invalid .field-error").text
    assert "greater than or equal to 0.1" in err
    browser.screenshot(f"console-invalid-{tag}")

    # the other pages, as this institution sees them
    browser.open(f"{server}/console/rules?study={st}")
    assert "ct-coronal: matched" in browser.text() and "picked" in browser.text()
    browser.screenshot(f"console-rules-{tag}")
    browser.open(f"{server}/console/load")
    assert re.search(r"SITE A\t0\t\t0\t2\t0\t0\t\d", browser.text()), browser.text()
    browser.screenshot(f"console-load-{tag}")
    browser.open(f"{server}/console/failures")
    browser.screenshot(f"console-failures-{tag}")

    # another institution sees none of it
    _logout(browser)
    _login(browser, server, "tok-b")
    text = browser.text()
    assert st not in text and "SITE A" not in text and "No jobs." in text
    browser.open(f"{server}/console/studies/{st}")
    text = browser.text()
    assert "not found" in text and "CHEST" not in text and "SITE A" not in text
    browser.open(f"{server}/console/load")
    assert "SITE A" not in browser.text()
    browser.screenshot(f"console-other-institution-{tag}")
    _logout(browser)
