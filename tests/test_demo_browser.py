"""The demo in a real browser: ``visattn demo`` serves it on localhost, headless Chromium runs one example
per tab, the outputs are checked and each tab is saved as a screenshot, in a temporary folder (set
``VISATTN_SCREENSHOTS=docs/img`` to refresh the README's pictures, ``docs/img/demo_<tab>.png``).

The browser is Debian's ``chromium`` driven by the ``playwright`` package (no browser download); when
either is missing the test fails, saying how to install them (``.ci/run`` does). Every tab runs on the
testbed models shipped in the package.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from visattn import demo
from visattn.testbed.data import SHAPES
from visattn.testbed.vlm import vocabulary

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = Path(os.environ.get("VISATTN_SCREENSHOTS") or tempfile.mkdtemp(prefix="visattn-demo-"))
#: the demo's start (imports of torch, timm, transformers, diffusers and Gradio) on a slow machine.
START_S = 120


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no Chromium found (chromium, chromium-browser or google-chrome on PATH): the demo's browser test "
                "needs one; on Debian: apt-get install -y chromium (.ci/run does this)", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """``visattn demo`` on a free port (started first: it loads while the stand-in weights are made)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "visattn.cli", "demo", "--host", "127.0.0.1", "--port",
                                 str(port), "--device", "cpu"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        yield proc, f"http://127.0.0.1:{port}/", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(app_process: tuple) -> Iterator[object]:
    """A Chromium page on the demo, once it answers."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail('the playwright package is missing: pip install -e ".[test]"', pytrace=False)
    chromium = _chromium()
    proc, url, log = app_process
    deadline = time.time() + START_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"visattn demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            pytest.fail(f"visattn demo did not answer at {url} within {START_S} s:\n{log.read_text()[-3000:]}",
                        pytrace=False)
        time.sleep(1)
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--no-sandbox", "--disable-dev-shm-usage"])
        except Exception as exc:  # the browser is there but cannot start: say why, loudly
            pytest.fail(f"Chromium at {chromium} did not start: {exc}", pytrace=False)
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        tab.set_default_timeout(90_000)
        tab.goto(url)
        tab.wait_for_selector("#vit-analyse")
        yield tab
        browser.close()


def _set_number(page: object, elem_id: str, value: float) -> None:
    """Type ``value`` into the number box of a slider or number field and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _wait_text(page: object, elem_id: str, text: str, timeout_s: float = 90) -> str:
    page.locator(f"#{elem_id}").get_by_text(text).first.wait_for(timeout=timeout_s * 1000)
    return page.locator(f"#{elem_id}").inner_text()


def _screenshot(page: object, tab: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"demo_{tab}.png"), full_page=True)


def test_vit_tab_merges_routes_maps_and_times(page):
    page.get_by_role("tab", name="ViT (timm)").click()
    page.locator("#vit-examples button").first.click()
    page.locator("#vit-analyse").click()
    tome = _wait_text(page, "vit-tome-text", "tokens entering each block")
    assert "[65, 57, 49, 41, 33, 25]" in tome  # r=8 on 64 patches and a class token
    assert any(shape in page.locator("#vit-label").inner_text() for shape in SHAPES)
    _wait_text(page, "vit-bra-text", "attends in layer 3")
    assert page.locator("#vit-tome img").count() >= 1 and page.locator("#vit-bra img").count() >= 1
    assert page.locator("#vit-maps").get_by_text("mean of 3 heads").count() >= 1 or \
        page.locator("#vit-maps img").count() >= 4

    box = page.locator("#vit-bra img").first.bounding_box()  # click the top-left region: region 0
    page.mouse.click(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.1)
    _wait_text(page, "vit-bra-text", "Region 0 (red)")
    assert page.locator("#vit-region input").input_value() == "0"

    _set_number(page, "vit-batch", 16)
    page.locator("#vit-speed").click()
    table = page.locator("#vit-table")
    for row in ("stock", "tome r=8", "bra n_win=4 topk=4"):  # exact: not the progress line "timing ..."
        table.get_by_text(row, exact=True).first.wait_for(state="attached")
    _screenshot(page, "vit")


def test_vlm_tab_answers_stock_and_three_methods(page):
    page.get_by_role("tab", name="Vision-language (transformers)").click()
    page.locator("#vlm-examples button").first.click()
    page.locator("#vlm-ask").click()
    note = _wait_text(page, "vlm-prune", "image tokens")
    assert "kept 16 of 64 image tokens" in note  # fastv keep=0.25
    words = set(vocabulary())
    for name in ("stock", "prune", "visual_sink", "head_modulation"):
        text = page.locator(f"#vlm-{name}").inner_text()
        assert name in text and text.split()[0] in words, text  # the answer, then the method
        assert page.locator(f"#vlm-{name}-img img").count() >= 1
    _screenshot(page, "vlm")


def test_diffusion_tab_samples_dense_and_sparse(page):
    page.get_by_role("tab", name="Diffusion (diffusers)").click()
    if demo.video_quality() is not None:  # the page says when the shipped model is below its quality bar
        assert "below its quality bar" in page.locator("#video-status").inner_text()
    page.locator("#video-examples").locator("tbody tr, button").first.click()
    page.locator("#video-run").click()  # the default 4 steps; sampling twice on 2 busy CPU cores can be slow
    text = _wait_text(page, "video-text", "PSNR", timeout_s=300)
    assert "dense" in text and "sparse_video tile_topk keep=0.25" in text and " dB" in text
    for part in ("dense", "sparse"):
        assert ".gif" in page.locator(f"#video-{part} img").first.get_attribute("src")
    assert page.locator("#video-strip img").count() >= 1
    _screenshot(page, "video")
