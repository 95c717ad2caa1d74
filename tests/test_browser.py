"""The headless Chromium harness tells a decoded image from a broken one and fetches nothing."""

from __future__ import annotations

from pathlib import Path

PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="


def test_decoded_and_broken_images_are_told_apart(browser, tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text(
        "<!doctype html><title>t</title><p>two images</p>"
        f'<img alt="ok" src="data:image/png;base64,{PIXEL}">'
        '<img alt="broken" src="data:image/png;base64,AAAA">'
    )
    browser.open(page)
    sizes = {i["alt"]: i["naturalWidth"] for i in browser.images()}
    assert sizes == {"ok": 1, "broken": 0}
    assert browser.fetched() == []
    assert "two images" in browser.text()
    shot = browser.screenshot("harness-selftest")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
