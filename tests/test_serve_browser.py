"""`ovss serve` end to end in headless Chromium: upload a toy scene, name classes, run, see the overlay.

On the way it presses Segment without classes, which must show the handler's message in the page.

Needs Debian's `chromium` and `chromium-driver`, and the `web` extra plus selenium; skips (saying which is
missing) otherwise. OVSS_UPDATE_DOCS_SCREENSHOT=1 copies the screenshot to docs/serve.png.
"""
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovss.toy import make_scene

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve.png"
SCENE_SIDE = 160
STARTUP_SECONDS = 40
RUN_SECONDS = 40

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver is not installed (apt-get install chromium-driver)"),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ovss serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"ovss serve did not answer on {url} within {STARTUP_SECONDS} s:\n{log.read_text()}")


@pytest.fixture
def server(tmp_path):
    """`ovss serve` on a free local port with the toy models (tiny ones until those are installed)."""
    pytest.importorskip("gradio", reason="the web extra is not installed (pip install 'ovss[web]')")
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ovss.cli", "serve", "--port", str(port), "--models", "toy",
                                 "--methods", "faseg", "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_http(url, proc, log)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1500", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_classes_run_shows_an_overlay_that_differs_from_the_input(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, log = server
    scene = make_scene(2_000_000, SCENE_SIDE).image
    scene_file = tmp_path / "toy_scene.png"
    scene.save(scene_file)

    browser.get(url)
    wait = WebDriverWait(browser, RUN_SECONDS)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(scene_file))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
    browser.find_element(By.CSS_SELECTOR, "#run").click()  # no classes yet: a message, not a crash
    wait.until(lambda d: "empty class list" in d.find_element(By.TAG_NAME, "body").text)
    for close in browser.find_elements(By.CSS_SELECTOR, "[class*=toast-close]"):  # keep the screenshot clear
        if close.is_displayed():
            close.click()
    wait.until(lambda d: "empty class list" not in d.find_element(By.TAG_NAME, "body").text)
    browser.find_element(By.CSS_SELECTOR, "#classes textarea").send_keys("ball, box, kite, star, ring, heart")
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay-faseg img"),
               message=f"no overlay appeared; server log:\n{log.read_text()}")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#masks-faseg img"))

    src = browser.find_element(By.CSS_SELECTOR, "#overlay-faseg img").get_attribute("src")
    with urllib.request.urlopen(src, timeout=10) as r:
        shown = Image.open(io.BytesIO(r.read())).convert("RGB")
    assert shown.height == SCENE_SIDE and shown.width > SCENE_SIDE  # the scene plus the legend panel
    painted = np.asarray(shown)[:, :SCENE_SIDE].astype(int)
    changed = np.abs(painted - np.asarray(scene).astype(int)).sum(axis=-1) > 0
    assert changed.mean() > 0.05, "the overlay shows the input unchanged"
    summary = " ".join(browser.find_element(By.CSS_SELECTOR, "#summary-faseg").text.split())
    assert "faseg" in summary and "background" in summary
    note = browser.find_element(By.CSS_SELECTOR, "#note").text
    assert ("tiny random-weight models" in note) == ("models tiny" in summary)  # toy falls back visibly

    time.sleep(0.5)  # let the galleries finish drawing before the picture is taken
    shot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("OVSS_UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)
