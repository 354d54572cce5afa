"""The viewer (issue #16) in a real browser: `m3 view` on a short training of the tiny scene, opened by headless
Chromium (Debian's chromium + chromium-driver, installed by setup) driven by Selenium. The page loads, a phrase typed
into its text box turns the splats around the object's known position into the highlight colour, and screenshots are
kept as artifacts ($M3_TEST_ARTIFACTS, else a pytest temporary folder; the path is printed)."""
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import node_process, wait_for
from m3_memory.viewer import HIGHLIGHT_RGB, Viewer

PHRASE = "yellow bath duck"
FOV = 0.8   # radians, vertical: the browser camera the test places


@pytest.fixture(scope="module")
def tiny(tiny_memory):
    root, path, memory = tiny_memory
    objects = json.loads((root / "objects.json").read_text())["objects"]
    return path, memory, {obj["name"]: np.asarray(obj["center"]) for obj in objects}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = Path(os.environ.get("M3_TEST_ARTIFACTS") or tmp_path_factory.mktemp("artifacts")) / "viewer"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nviewer screenshots: {folder}")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny):
    """`m3 view` in its own process; yields its URL once it printed it."""
    with node_process("m3", "view", str(tiny[0]), "--port", str(free_port())) as process:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            line = process.stdout.readline()
            lines.append(line)
            if line.startswith("{"):
                break
        assert lines and lines[-1].startswith("{"), f"m3 view printed no URL:\n{''.join(lines)}"
        yield json.loads(lines[-1])["url"]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromedriver not found: `make setup` (as root) installs Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    # WebGL without a GPU: SwiftShader, Chromium's software renderer.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-angle=swiftshader",
                 "--enable-unsafe-swiftshader", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world `[4, 4]` (optical axes) of a camera at `eye` looking at `target` with +z up, as three.js does."""
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, np.cross(forward, right), forward], axis=1)
    c2w[:3, 3] = eye
    return c2w


def screenshot(driver, path: Path) -> np.ndarray:
    """The canvas area of a screenshot `[H, W, 3]` (saved to `path`)."""
    driver.save_screenshot(str(path))
    x, y, w, h = driver.execute_script(
        "const r = document.querySelector('canvas').getBoundingClientRect(); return [r.x, r.y, r.width, r.height];")
    ratio = driver.execute_script("return window.devicePixelRatio;")
    image = np.asarray(Image.open(path).convert("RGB"))
    return image[round(y * ratio):round((y + h) * ratio), round(x * ratio):round((x + w) * ratio)]


def highlighted(image: np.ndarray, uv: np.ndarray, radius: int = 25) -> float:
    """Fraction of the pixels within `radius` of `uv: [2]` that show the highlight colour (blended with white)."""
    u, v = np.round(uv).astype(int)
    patch = image[max(v - radius, 0):v + radius, max(u - radius, 0):u + radius].astype(int)
    r, g, b = patch[..., 0], patch[..., 1], patch[..., 2]
    assert HIGHLIGHT_RGB == (255, 0, 255)
    return float(((r > 150) & (b > 150) & (g < 110) & (np.abs(r - b) < 80)).mean()) if patch.size else 0.0


def test_a_typed_query_highlights_the_object_in_the_browser(served, browser, tiny, artifacts):
    from selenium.webdriver.common.by import By

    path, memory, centres = tiny
    duck = centres[PHRASE]
    first_camera = memory.views.c2w[0]
    eye = duck + 0.9 * (first_camera[:3, 3] - duck) / np.linalg.norm(first_camera[:3, 3] - duck)
    fmt = lambda v: ",".join(f"{x:.4f}" for x in v)  # noqa: E731
    browser.get(f"{served}/?initialCameraPosition={fmt(eye)}&initialCameraLookAt={fmt(duck)}"
                f"&initialCameraUp=0,0,1&initialCameraFov={FOV}")
    assert wait_for(lambda: browser.find_elements(By.XPATH, "//label[text()='Find']"), 60), "the page has no Find box"

    def canvas() -> np.ndarray:
        return screenshot(browser, artifacts / "before.png")

    # The splats arrive and are drawn: the canvas centre (the duck) is no longer the white background.
    assert wait_for(lambda: canvas()[200:-200, 300:-300].mean() < 240, 60, interval=1.0), "no splats were drawn"
    before = canvas()
    h, w = before.shape[:2]
    c2w = look_at(eye, duck)
    focal = (h / 2) / np.tan(FOV / 2)

    def project(point: np.ndarray) -> np.ndarray | None:
        cam = (point - c2w[:3, 3]) @ c2w[:3, :3]
        if cam[2] <= 0.05:
            return None
        uv = focal * cam[:2] / cam[2] + [w / 2, h / 2]
        return uv if 30 <= uv[0] < w - 330 and 30 <= uv[1] < h - 30 else None   # clear of the control panel

    centre = project(duck)
    assert highlighted(before, centre) < 0.05

    browser.find_element(By.XPATH, "//label[text()='Find']/following::input[1]").send_keys(PHRASE)
    browser.find_element(By.XPATH, "//button[normalize-space()='Ask']").click()
    after_path = artifacts / f"{PHRASE.replace(' ', '_')}.png"
    found = wait_for(lambda: highlighted(screenshot(browser, after_path), centre) > 0.3, 90, interval=1.0)
    after = screenshot(browser, after_path)
    assert found, f"the duck did not turn the highlight colour ({highlighted(after, centre):.2f}); see {after_path}"
    # The highlight is the duck's, not the whole scene's: the canvas (left of the control panel) is far less of it.
    overall = highlighted(after[:, :w - 330], np.array([(w - 330) / 2, h / 2]), radius=max(w, h))
    assert overall < 0.5 * highlighted(after, centre), f"{overall:.2f} of the canvas is highlighted"
    assert browser.find_elements(By.XPATH, "//*[contains(text(), 'seen by')]"), "no instance list"


def test_viewer_answers_and_follows_a_new_memory(tiny):
    path, memory, centres = tiny
    viewer = Viewer(memory, port=free_port())
    try:
        answer = viewer.ask(PHRASE)
        assert answer is not None and np.linalg.norm(answer.point - centres[PHRASE]) < 0.1
        assert viewer.heatmap.visible and viewer.heatmap.image.shape[2] == 3
        assert viewer.threshold.value == pytest.approx(answer.threshold, abs=0.005)
        assert "seen by" in viewer.instance_list.content
        viewer.set_memory(memory)              # as the memory server does on a reload: the phrase is asked again
        assert viewer.answer is not None and viewer.answer.query == PHRASE
        assert viewer.ask("") is None and "No answer" in viewer.message.content
    finally:
        viewer.close()
