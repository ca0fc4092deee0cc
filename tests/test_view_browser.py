"""``text3dsam view`` in a real browser: headless Debian Chromium driven by Selenium through chromedriver.

The page must draw the scan (WebGL through SwiftShader), and typing a prompt + Enter must bring its overlay
and legend row; the page may request nothing but this server. A screenshot is written to the test's
temporary folder, and to ``$TEXT3DSAM_VIEW_SCREENSHOT`` when that is set (how ``docs/images/view.png``
is made: ``TEXT3DSAM_VIEW_SCREENSHOT=docs/images/view.png pytest tests/test_view_browser.py``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

pytest.importorskip("uvicorn", reason="the view extra (uvicorn) is not installed")
pytest.importorskip("selenium", reason="selenium is not installed")

CT = DATA / "nifti" / "totalsegmentator" / "example_ct_sm.nii.gz"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
         "--window-size=1400,860", "--hide-scrollbars", "--force-device-scale-factor=1"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="no Chromium/chromedriver here (apt-get install chromium chromium-driver)"),
]


@pytest.fixture(scope="module")
def server(small_model):
    """The viewer for the CT example and the small checkpoint, on a free loopback port, in a thread: its
    origin and the address ``text3dsam view`` prints and opens (access token included)."""
    from text3dsam_cli.inference import Segmenter
    from text3dsam_cli.view import ViewSession
    from text3dsam_cli.view.server import make_server

    session = ViewSession.open(str(CT), Segmenter(small_model, device="cpu", mode="whole"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server, url = make_server(session, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.2)
    status = driver.execute_script("return document.querySelector('#status').textContent")
    raise AssertionError(f"timed out waiting for {what} (page status: {status!r}; console: "
                         f"{[e['message'] for e in driver.get_log('browser')]})")


def _canvas_pixels(driver) -> np.ndarray:
    """The canvas as the screen shows it: (h, w, 3) uint8 from a real screenshot, cropped to the canvas."""
    from PIL import Image

    rect = driver.execute_script("const r = document.querySelector('#gl').getBoundingClientRect();"
                                 "return [r.left, r.top, r.width, r.height];")
    shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
    x, y, w, h = (round(v) for v in rect)
    return shot[y : y + h, x : x + w]


def _overlay_pixels(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    """Pixels tinted towards ``colour`` (the scan itself is grey: r == g == b)."""
    p = pixels.astype(np.int32)
    grey = p.mean(axis=2, keepdims=True)
    tint = p - grey
    target = np.asarray(colour, dtype=np.float64) - np.mean(colour)
    target /= np.linalg.norm(target)
    along = (tint * target).sum(axis=2)
    return int(((along > 25) & (np.linalg.norm(tint, axis=2) < 1.5 * along + 1)).sum())


def test_page_draws_the_scan_and_a_typed_prompt_shows_overlay_and_legend(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server, printed = server
    assert printed.startswith(server + "/?token=")
    browser.get(printed)
    assert browser.current_url == server + "/"  # the token went into a cookie, out of the address bar
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), 90, "the scan")
    time.sleep(1.0)  # let NiiVue finish its first frames
    before = _canvas_pixels(browser)
    assert before.shape[0] > 200 and before.shape[1] > 400
    # The scan is drawn: many grey levels on the canvas, not a blank or single-colour surface.
    grey_levels = np.unique(before[..., 0][before[..., 0] == before[..., 1]])
    assert grey_levels.size > 50, f"canvas shows only {grey_levels.size} grey levels: the scan is not drawn"
    assert _overlay_pixels(before, (230, 25, 75)) < 50

    box = browser.find_element(By.ID, "prompt")
    for revision, prompt in enumerate(["pancreas", "aorta"], start=1):
        box.send_keys(prompt)
        # Suggestions from the training vocabulary follow what is typed.
        _wait(browser, lambda d, p=prompt: d.execute_script(
            "return [...document.querySelectorAll('#suggestions option')].some(o => "
            f"o.value.toLowerCase().includes('{p}'))"), 30, f"suggestions for {prompt!r}")
        box.send_keys(Keys.ENTER)
        _wait(browser, lambda d, r=revision: d.execute_script(f"return document.body.dataset.revision === '{r}'"),
              120, f"the overlay of {prompt!r}")
    time.sleep(1.0)
    rows = browser.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
    assert [r.get_attribute("data-prompt") for r in rows] == ["pancreas", "aorta"]
    answer = json.loads(browser.execute_script(
        "const r = await fetch('/api/segment', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({prompts: ['pancreas', 'aorta']})}); return await r.text();"))
    after = _canvas_pixels(browser)
    for row, expected, colour in zip(rows, answer["labels"], [(230, 25, 75), (60, 180, 75)]):
        cells = row.find_elements(By.TAG_NAME, "td")
        assert cells[1].text == expected["prompt"]
        assert abs(float(cells[2].text) - expected["volume_ml"]) < 0.06
        assert int(cells[3].text) == expected["components"]
        swatch = row.find_element(By.CLASS_NAME, "swatch").value_of_css_property("background-color")
        assert ", ".join(map(str, colour)) in swatch
        tinted = _overlay_pixels(after, colour)
        if expected["voxels"] > 1000:
            assert tinted > 200, f"only {tinted} pixels of {expected['prompt']}'s colour on the canvas"

    png = browser.get_screenshot_as_png()
    (tmp_path / "view.png").write_bytes(png)
    target = os.environ.get("TEXT3DSAM_VIEW_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(png)

    # Toggling a prompt off removes its overlay (the map is recomputed without it); its legend row stays.
    rows[0].find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    _wait(browser, lambda d: d.execute_script("return document.body.dataset.revision === '3'"), 60, "toggle")
    time.sleep(0.5)
    assert _overlay_pixels(_canvas_pixels(browser), (230, 25, 75)) < 50
    assert browser.find_element(By.CSS_SELECTOR, "#legend tbody tr").get_attribute("class") == "off"

    # The page asked this server only: no CDN, no other host.
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    ours = [u for u in urls if not u.startswith(("chrome:", "chrome-untrusted:", "data:", "blob:"))]
    assert any(u == server + "/" for u in ours), urls  # Chromium's own start page aside
    assert all(u.startswith(server + "/") for u in ours), ours
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
