"""The web demo (demo/app.py) in a real browser: headless Chromium (Debian's chromium + chromium-driver,
installed by scripts/install_browser.sh, which .ci/run runs) drives the page served on 127.0.0.1:
load it, upload an image, run referring, click on the image for an interactive point and run it, and
check that an overlay image, the masks PNG and the result JSON come back. A screenshot of the page
is written to output/test_artifacts/demo_app.png.

Without Chromium the test is skipped, except under CI (CI=true), where a missing browser is an error.
"""
import importlib.util
import json
import os
import shutil
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO_ROOT
from .tiny_model_dir import make_tiny_model_dir

CHROMIUM = os.environ.get("PSALM_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PSALM_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
ARTIFACTS = REPO_ROOT / "output" / "test_artifacts"
SAMPLE = REPO_ROOT / "demo" / "sample.jpg"
TIMEOUT = 120  # seconds for one model run on a busy 2-core machine


def _need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.isfile(p)]
    if missing:
        msg = f"{missing} not found: install them with `bash scripts/install_browser.sh` (Debian chromium, chromium-driver)"
        if os.environ.get("CI"):
            raise FileNotFoundError(msg)
        pytest.skip(msg)
    pytest.importorskip("selenium", reason="selenium is in scripts/requirements.txt: bash scripts/install.sh")


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """demo/app.py on a tiny model directory, served in this process; yields the page's URL."""
    _need_browser()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    base = tmp_path_factory.mktemp("browser")
    model = make_tiny_model_dir(base / "model", base / "tok_cache")
    spec = importlib.util.spec_from_file_location("psalm_demo_app_browser", REPO_ROOT / "demo" / "app.py")
    app_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_mod)
    session, kwargs = app_mod.make_session(app_mod.get_parser().parse_args(["--model", str(model)]))
    assert session.predictor is not None
    blocks = app_mod.build_app(session, **kwargs)
    _, url, _ = app_mod.launch(blocks, "127.0.0.1", None, prevent_thread_lock=True)
    try:
        yield url
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def browser(served_app):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1800"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, what, cond, timeout=TIMEOUT):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(lambda d: cond(d))
    except Exception as e:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "demo_app_failure.png"))
        status = driver.find_elements("css selector", "#psalm-status")
        raise AssertionError(f"timed out waiting for {what}; status: {status[0].text if status else '?'!r} "
                             f"(screenshot output/test_artifacts/demo_app_failure.png)") from e


def _status(driver) -> str:
    return driver.find_element("css selector", "#psalm-status").text


def _overlay_src(driver) -> str:
    imgs = driver.find_elements("css selector", "#psalm-overlay img")
    ok = [i for i in imgs if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)]
    return ok[0].get_attribute("src") if ok else ""


def _download_links(driver) -> dict:
    links = driver.find_elements("css selector", "#psalm-downloads a")
    return {os.path.basename(a.get_attribute("href").split("?")[0]): a.get_attribute("href") for a in links
            if a.get_attribute("href")}


def _fetch(url: str) -> bytes:
    assert url.startswith("http://127.0.0.1:"), url  # the page's own server, nothing else
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def _run_and_check(driver, expect_masks: int, previous_src: str = ""):
    driver.find_element("css selector", "#psalm-run").click()
    _wait(driver, "the result", lambda d: _status(d).startswith("Done") and _overlay_src(d) not in ("", previous_src))
    src = _overlay_src(driver)
    links = _wait(driver, "the download links", lambda d: (lambda l: l if "result_masks.png" in l else None)(
        _download_links(d)))
    record = json.loads(_fetch(links["result.json"]))
    assert len(record["segments"]) == expect_masks, record
    masks = np.asarray(Image.open(__import__("io").BytesIO(_fetch(links["result_masks.png"]))))
    assert masks.shape == (320, 480)  # demo/sample.jpg
    assert set(np.unique(masks).tolist()) <= {0} | {s["id"] for s in record["segments"]}
    return src, record


def test_demo_page_referring_and_interactive_click(browser, served_app):
    from selenium.webdriver.common.action_chains import ActionChains

    driver = browser
    driver.get(served_app)
    _wait(driver, "the page", lambda d: d.find_elements("css selector", "#psalm-run"), timeout=60)
    assert "PSALM" in driver.find_element("css selector", "#psalm-header").text

    # upload demo/sample.jpg: the click canvas shows it
    upload = driver.find_element("css selector", "#psalm-upload input[type=file]")
    upload.send_keys(str(SAMPLE))
    _wait(driver, "the uploaded image on the canvas",
          lambda d: d.find_elements("css selector", "#psalm-canvas img") and _status(d).startswith("Image loaded"))

    # referring
    driver.find_element("css selector", "#psalm-text textarea").send_keys("the white cup")
    src, record = _run_and_check(driver, expect_masks=1)
    assert record["task"] == "referring" and record["segments"][0]["label"] == "the white cup"

    # interactive: one click on the image adds a point prompt
    driver.find_element("xpath", "//*[@id='psalm-task']//label[contains(., 'Interactive')]").click()
    _wait(driver, "the interactive controls", lambda d: d.find_element("css selector", "#psalm-prompts").is_displayed())
    canvas = driver.find_element("css selector", "#psalm-canvas img")
    w, h = canvas.size["width"], canvas.size["height"]
    # 30% from the left, 40% from the top of the displayed image (offsets are from its centre)
    ActionChains(driver).move_to_element_with_offset(canvas, int(-0.2 * w), int(-0.1 * h)).click().perform()
    prompts = driver.find_element("css selector", "#psalm-prompts textarea")
    _wait(driver, "the point prompt", lambda d: prompts.get_attribute("value").startswith("point "))
    x, y = (float(v) for v in prompts.get_attribute("value").split()[1].split(","))
    assert abs(x - 0.3 * 480) < 15 and abs(y - 0.4 * 320) < 15, (x, y)
    _, record = _run_and_check(driver, expect_masks=1, previous_src=src)
    assert record["task"] == "interactive" and record["segments"][0]["label"] == "point"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    assert driver.save_screenshot(str(ARTIFACTS / "demo_app.png"))
