"""Headless Chromium for tests that look at what a person would see (report.html, web console).

Debian's ``chromium`` driven through ``chromium-driver`` with selenium (``make sysdeps`` installs
both). Selenium is pointed at those binaries explicitly: its own manager would try to download a
browser, which this machine cannot do. Screenshots go to ``.sprim/artifacts/screenshots/``
(git-ignored), one PNG per call, named by the test.

Use the ``browser`` fixture (one Chromium per test module)::

    def test_report_shows_every_preview(browser):
        browser.open(out / "report.html")
        assert all(img["naturalWidth"] > 0 for img in browser.images())
        browser.screenshot("report")
"""

from __future__ import annotations

import base64
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".sprim" / "artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"
#: Debian's binaries (chromium, chromium-driver).
BROWSER_NAMES = ("chromium", "chromium-browser")
DRIVER_NAMES = ("chromedriver",)


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when either is missing."""
    browser = next(filter(None, map(shutil.which, BROWSER_NAMES)), None)
    driver = next(filter(None, map(shutil.which, DRIVER_NAMES)), None)
    return (browser, driver) if browser and driver else None


_IMAGES_JS = """
return Array.from(document.images).map(i => ({
  src: i.currentSrc.slice(0, 80), alt: i.alt, complete: i.complete,
  naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}));
"""


class Browser:
    """One headless Chromium session (a selenium WebDriver in ``driver``)."""

    def __init__(self, driver, timeout: float = 20.0) -> None:
        self.driver = driver
        self.timeout = timeout

    def open(self, target: str | Path) -> None:
        """Load a URL, or a local file given as a Path; waits until the page has loaded."""
        url = target.resolve().as_uri() if isinstance(target, Path) else target
        self.driver.get(url)
        self.wait_for("return document.readyState === 'complete'")

    def wait_for(self, script: str, timeout: float | None = None):
        """Wait until the JavaScript ``script`` returns something truthy; returns it."""
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, timeout or self.timeout).until(
            lambda d: d.execute_script(script)
        )

    def images(self) -> list[dict]:
        """Every <img> once all have finished loading: src (first 80 characters), alt,
        complete, naturalWidth, naturalHeight (0 when the image could not be decoded)."""
        self.wait_for("return Array.from(document.images).every(i => i.complete)")
        return self.driver.execute_script(_IMAGES_JS)

    def fetched(self) -> list[str]:
        """URLs the page fetched after the document itself (data: URIs are not fetches)."""
        return self.driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )

    def screenshot(self, name: str) -> Path:
        """Full-page PNG under ``.sprim/artifacts/screenshots/NAME.png``; returns its path."""
        metrics = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": min(size["height"], 16000),
                    "scale": 1,
                },
            },
        )
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def text(self) -> str:
        """The page's visible text."""
        return self.driver.execute_script("return document.body.innerText")


@contextmanager
def headless_chromium(width: int = 1280, height: int = 1024) -> Iterator[Browser]:
    """A headless Chromium with a private profile, quit and removed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("chromium and chromedriver are not installed (make sysdeps)")
    browser_exe, driver_exe = paths
    profile = tempfile.mkdtemp(prefix="sprim-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser_exe
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_exe))
    try:
        yield Browser(driver)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """A headless Chromium for the test module (skips when Chromium is not installed)."""
    if chromium_paths() is None:
        pytest.skip("chromium + chromium-driver not installed (make sysdeps)")
    pytest.importorskip("selenium", reason="selenium not installed (make venv)")
    with headless_chromium() as b:
        yield b
