"""The web page in a real browser (Debian's chromium driven by Playwright) against a real
`python -m serving` process: create a gallery, add a folder as a background job and watch it
finish, search (with paging and a negative term), open a result, find similar, search by an
uploaded image, upload pictures into the gallery, see an error in words, a phone-sized layout,
and the gallery reopened after a reload. Screenshots of the main
states go to a temporary folder, or to $SMART_GALLERY_SCREENSHOTS (e.g. docs/img) when set."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.serving_fixtures import ServerProcess, tiny_checkpoint, write_image

CHROMIUM = "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extras)")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium missing: scripts/install_system_deps.sh")
COUNT = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("ui")
    cwd = base / "cwd"
    cwd.mkdir()
    for index in range(COUNT):
        write_image(base / "pictures" / "trip" / f"photo{index:02d}.jpg", 600 + index, size=(480, 360))
    (base / "pictures" / "trip" / "broken.jpg").write_text("not a picture")
    write_image(base / "elsewhere" / "query.png", 605, size=(480, 360))  # same pixels as photo05.jpg
    write_image(base / "elsewhere" / "new.png", 900, size=(300, 200))
    process = ServerProcess(tiny_checkpoint(1)[0], base / "db", cwd).wait_ready()
    yield {"url": process.url, "base": base}
    process.stop()


@pytest.fixture()
def page():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1100, "height": 800})
        page = context.new_page()
        page.set_default_timeout(15_000)
        yield page
        browser.close()


def test_gallery_page_end_to_end(server, page, tmp_path):
    expect = playwright.expect
    shots = Path(os.environ.get("SMART_GALLERY_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    base = server["base"]

    page.goto(server["url"] + "/")
    expect(page).to_have_title("Smart Gallery")
    page.fill("#gallery-name", "holiday")
    page.keyboard.press("Enter")  # the form works from the keyboard
    expect(page.locator("#gallery-info")).to_contain_text("“holiday”: 0 images")

    # An error is shown in words, and nothing else changes.
    page.fill("#folder-path", str(base / "pictures" / "missing"))
    page.click("#folder-add")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("no such folder")

    page.fill("#folder-path", str(base / "pictures"))
    page.click("#folder-add")
    expect(page.locator("#error")).to_be_hidden()
    status = page.locator("#job-status")
    expect(status).to_have_attribute("data-state", "done", timeout=30_000)
    expect(status).to_contain_text(f"Done: {COUNT + 1}/{COUNT + 1}")
    expect(status).to_contain_text(f"{COUNT} added")
    expect(status).to_contain_text("1 failed")
    expect(page.locator("#job-progress")).to_have_attribute("value", str(COUNT + 1))
    expect(page.locator("#job-failures")).to_contain_text("broken.jpg")
    expect(page.locator("#gallery-info")).to_contain_text(f"{COUNT} images")

    page.fill("#query", "a sunny beach")
    page.click("#search-button")
    results = page.locator("#results li")
    expect(results).to_have_count(24)
    expect(page.locator("#result-summary")).to_contain_text(f"24 results for “a sunny beach” among {COUNT} images")
    first_score = float(results.first.locator(".score").inner_text())
    assert -1 <= first_score <= 1
    page.wait_for_function("[...document.querySelectorAll('#results img')].slice(0, 8).every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(shots / "web-search.png"))
    page.click("#more")
    expect(results).to_have_count(COUNT)
    expect(page.locator("#more")).to_be_hidden()

    page.fill("#query", "a sunny beach -people")
    page.click("#search-button")
    expect(page.locator("#result-summary")).to_contain_text("without “people”")

    results.first.locator("button").click()
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    expect(page.locator("#viewer-meta")).to_contain_text(str(base / "pictures" / "trip"))
    expect(page.locator("#viewer-meta")).to_contain_text("480 × 360 px")
    page.wait_for_function("document.querySelector('#viewer-image').complete && document.querySelector('#viewer-image').naturalWidth === 480")
    opened = page.locator("#viewer-name").inner_text()
    page.screenshot(path=str(shots / "web-viewer.png"))
    page.click("#similar")
    expect(viewer).to_be_hidden()
    expect(page.locator("#result-summary")).to_contain_text("pictures like the one you chose")
    names = results.locator(".name").all_inner_texts()
    assert len(names) == 24 and opened not in names  # the image itself is left out

    page.set_input_files("#image-file", str(base / "elsewhere" / "query.png"))
    expect(page.locator("#result-summary")).to_contain_text("pictures like query.png")
    expect(results.first.locator(".name")).to_have_text("photo05.jpg")
    assert float(results.first.locator(".score").inner_text()) > 0.99

    page.set_input_files("#upload-files", [str(base / "elsewhere" / "query.png"), str(base / "elsewhere" / "new.png")])
    expect(page.locator("#upload-status")).to_have_text("Uploaded: 2 added, 0 already there, 0 failed")
    expect(page.locator("#gallery-info")).to_contain_text(f"{COUNT + 2} images")

    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    columns = page.evaluate("getComputedStyle(document.querySelector('#results')).gridTemplateColumns.split(' ').length")
    assert columns == 2
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(shots / "web-phone.png"))
    assert re.match(r"^\d+\.\d{3}$", results.first.locator(".score").inner_text())

    page.reload()  # the browser remembers the gallery and reopens it
    expect(page.locator("#gallery-info")).to_contain_text(f"“holiday”: {COUNT + 2} images")
    expect(page.locator("#workspace")).to_be_visible()


def test_page_keeps_each_gallerys_key(tmp_path, page):
    """A server that requires keys: the page creates a gallery, keeps the key it was given, uses
    it for every call (thumbnails included) and after a reload; another browser must enter it."""
    expect = playwright.expect
    for index in range(3):
        write_image(tmp_path / "pictures" / f"k{index}.jpg", 700 + index, size=(200, 150))
    process = ServerProcess(tiny_checkpoint(1)[0], tmp_path / "db", tmp_path, "auth=true").wait_ready()
    try:
        page.goto(process.url + "/")
        page.fill("#gallery-name", "keyed")
        page.keyboard.press("Enter")
        expect(page.locator("#gallery-info")).to_contain_text("“keyed”: 0 images")
        key = page.evaluate("JSON.parse(localStorage.getItem('sg.keys'))['keyed']")
        assert key.startswith("sgk_")
        page.fill("#folder-path", str(tmp_path / "pictures"))
        page.click("#folder-add")
        expect(page.locator("#job-status")).to_have_attribute("data-state", "done", timeout=30_000)
        page.fill("#query", "anything")
        page.click("#search-button")
        expect(page.locator("#results li")).to_have_count(3)
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        page.reload()
        expect(page.locator("#gallery-info")).to_contain_text("“keyed”: 3 images")

        page.evaluate("localStorage.clear()")  # another browser: the gallery needs its key
        page.reload()
        page.fill("#gallery-name", "keyed")
        page.keyboard.press("Enter")
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#error")).to_contain_text("open it with its key")
        page.fill("#api-key", key)
        page.keyboard.press("Enter")
        page.fill("#gallery-name", "keyed")
        page.click("#gallery-open")
        expect(page.locator("#gallery-info")).to_contain_text("“keyed”: 3 images")
    finally:
        process.stop()
