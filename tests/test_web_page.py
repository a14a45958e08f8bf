"""The drawing page (web/) in a real browser, served by the embedded server and by nginx in front of it.

Headless Chromium and chromedriver from Debian's packages, driven by Selenium through an explicit Service, so
nothing downloads a browser or a driver; nginx from Debian runs web/nginx.conf with only its listen address,
upstream and root changed. Without them (apt-get install chromium chromium-driver nginx) the tests skip.

The session's model is tiny, so no test requires a particular digit for a drawing: what the page shows must
equal what the REST API answers for the same PNG.

    python -m tests.test_web_page MODEL_BASE_PATH docs/drawing-page.png   # the README's screenshot
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = ROOT / "web"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
NGINX = "/usr/sbin/nginx"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
    # On a network that reaches only package registries, Chromium's own background traffic makes it misbehave.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1",
]
WINDOW = (900, 860)
PAD_SIZE = 280  # the canvas's own pixels (web/index.html)
WAIT_SECONDS = 15


def require(path: str, package: str) -> None:
    if not os.access(path, os.X_OK):
        pytest.skip(f"{path} is not installed (apt-get install {package})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the REST API, asked directly -----------------------------------------------------------------------

def api_predict(port: int, image: bytes, path: str = "/v1/models/mnist:predict") -> tuple[int, dict]:
    body = json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(image).decode()}}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


# --- the browser ------------------------------------------------------------------------------------------

def start_browser(user_data_dir: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "--window-size={},{}".format(*WINDOW)]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def open_page(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, WAIT_SECONDS).until(
        lambda d: d.execute_script("return document.querySelectorAll('#bars li').length") == 10)


def three_stroke() -> list[tuple[float, float]]:
    """A handwritten-looking "3" in the canvas's pixels: an upper and a lower arc, in one stroke."""
    upper = [(140 + 48 * math.cos(math.radians(a)), 92 + 46 * math.sin(math.radians(a))) for a in range(200, 451, 15)]
    lower = [(140 + 52 * math.cos(math.radians(a)), 188 + 50 * math.sin(math.radians(a))) for a in range(270, 521, 15)]
    return upper + lower


def draw(driver, strokes: list[list[tuple[float, float]]], pointer: str = "mouse") -> None:
    """Draws with real pointer input (W3C actions: pointerdown, pointermove..., pointerup) of the given kind."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By

    pad = driver.find_element(By.ID, "pad")
    scale = pad.rect["width"] / PAD_SIZE  # offsets are CSS pixels from the element's centre
    kind = {"mouse": interaction.POINTER_MOUSE, "touch": interaction.POINTER_TOUCH, "pen": interaction.POINTER_PEN}
    actions = ActionBuilder(driver, mouse=PointerInput(kind[pointer], pointer), duration=0)
    for stroke in strokes:
        offsets = [((x - PAD_SIZE / 2) * scale, (y - PAD_SIZE / 2) * scale) for x, y in stroke]
        actions.pointer_action.move_to(pad, *offsets[0]).pointer_down()
        for offset in offsets[1:]:
            actions.pointer_action.move_to(pad, *offset)
        actions.pointer_action.pointer_up()
    actions.perform()


def resources(driver) -> list[dict]:
    """What the page has requested since it loaded, in order: URL and kind ("fetch", "script", ...)."""
    return driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => ({url: e.name, kind: e.initiatorType}))")


def canvas_png(driver) -> bytes:
    url = driver.execute_script("return document.getElementById('pad').toDataURL('image/png')")
    assert url.startswith("data:image/png;base64,")
    return base64.b64decode(url.split(",", 1)[1])


def ink_pixels(driver) -> int:
    return driver.execute_script("""
        const pad = document.getElementById('pad');
        const data = pad.getContext('2d').getImageData(0, 0, pad.width, pad.height).data;
        let dark = 0;
        for (let i = 0; i < data.length; i += 4) { if (data[i] < 128) dark++; }
        return dark;""")


def click(driver, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, element_id).click()


def shown(driver) -> dict:
    """Waits for the page's answer or error, then reads what it shows."""
    from selenium.webdriver.support.ui import WebDriverWait

    read = """
        const visible = (id) => !document.getElementById(id).hidden;
        if (document.getElementById('status').getAttribute('aria-busy')) return null;
        if (!visible('answer') && !visible('error')) return null;
        return {
          message: document.getElementById('message').textContent,
          answer: visible('answer'),
          digit: document.getElementById('digit').textContent,
          probability: document.getElementById('probability').textContent,
          error: visible('error') ? document.getElementById('error').textContent : null,
          bars: [...document.querySelectorAll('#bars li')].map((li) => ({
            digit: li.dataset.digit, probability: li.dataset.probability, top: li.classList.contains('top'),
            text: li.querySelector('.value').textContent,
            fraction: li.querySelector('.fill').getBoundingClientRect().width /
                      li.querySelector('.track').getBoundingClientRect().width,
          })),
        };"""
    return WebDriverWait(driver, WAIT_SECONDS).until(lambda d: d.execute_script(read))


def assert_shows(page: dict, prediction: dict) -> None:
    """The page shows the API's prediction: the digit, its probability and ten bars of the right lengths."""
    assert page["answer"] and page["error"] is None
    assert page["digit"] == str(prediction["digit"])
    assert page["probability"] == f"{100 * prediction['probability']:.1f}%"
    assert [bar["digit"] for bar in page["bars"]] == [str(d) for d in range(10)]
    for bar, p in zip(page["bars"], prediction["probabilities"], strict=True):
        assert float(bar["probability"]) == pytest.approx(p, abs=1e-6)
        assert bar["text"] == f"{100 * p:.1f}%"
        assert bar["fraction"] == pytest.approx(p, abs=0.01)
        assert bar["top"] == (bar["digit"] == str(prediction["digit"]))


# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pytest.importorskip("selenium")
    require(CHROMIUM, "chromium")
    require(CHROMEDRIVER, "chromium-driver")
    driver = start_browser(str(tmp_path_factory.mktemp("chromium-profile")))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(embedded_server):
    return embedded_server


@pytest.fixture
def page(browser, server):
    """The page, fresh from the embedded server."""
    open_page(browser, f"http://127.0.0.1:{server.rest_port}/")
    return browser


def site_config(listen_port: int, upstream_port: int) -> str:
    """web/nginx.conf with only the listen address, the upstream's server and the root pointed at this
    machine: each directive replaced by name, whatever value the file gives it."""
    text = (WEB_DIR / "nginx.conf").read_text()
    for name, value in [("listen", f"127.0.0.1:{listen_port}"), ("server", f"127.0.0.1:{upstream_port}"),
                        ("root", str(WEB_DIR))]:
        text, count = re.subn(rf"^(\s*{name}\s+)[^;{{}}\n]+;", lambda m, v=value: f"{m[1]}{v};", text,
                              flags=re.MULTILINE)
        assert count == 1, f"web/nginx.conf should have one {name} directive, not {count}"
    return text


def main_config(prefix: Path, site: Path) -> str:
    """What the official image's /etc/nginx/nginx.conf does around conf.d/, with every path in prefix."""
    user = "user root;" if os.geteuid() == 0 else ""  # workers read the test's private temp dirs
    return f"""
        {user}
        daemon off;
        worker_processes 1;
        pid {prefix}/nginx.pid;
        error_log {prefix}/error.log notice;
        events {{ worker_connections 64; }}
        http {{
            include /etc/nginx/mime.types;
            default_type application/octet-stream;
            access_log {prefix}/access.log;
            client_body_temp_path {prefix}/client_body;
            proxy_temp_path {prefix}/proxy;
            fastcgi_temp_path {prefix}/fastcgi;
            uwsgi_temp_path {prefix}/uwsgi;
            scgi_temp_path {prefix}/scgi;
            include {site};
        }}
        """


@contextlib.contextmanager
def running_nginx(prefix: Path, upstream_port: int):
    """Debian's nginx running web/nginx.conf in front of 127.0.0.1:upstream_port, all its files in prefix;
    yields the port it listens on."""
    require(NGINX, "nginx")
    port = free_port()
    site = prefix / "default.conf"
    site.write_text(site_config(port, upstream_port))
    (prefix / "nginx.conf").write_text(main_config(prefix, site))
    argv = [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (prefix / "error.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen within 10 s"
                time.sleep(0.05)
        yield port
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful shutdown
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def nginx(server, tmp_path_factory):
    with running_nginx(tmp_path_factory.mktemp("nginx"), server.rest_port) as port:
        yield port


# --- the page on the embedded server -----------------------------------------------------------------------

def draw_and_compare_with_the_api(driver, rest_port: int) -> dict:
    """Draws a 3, clicks predict, and checks the page asked the server it came from, at a URL where the REST
    API answers the canvas's PNG with what the page shows."""
    draw(driver, [three_stroke()])
    png = canvas_png(driver)
    before = len(resources(driver))
    click(driver, "predict")
    shows = shown(driver)
    [asked] = resources(driver)[before:]  # one request for one click
    url = urlsplit(asked["url"])
    assert asked["kind"] == "fetch" and url.netloc == urlsplit(driver.current_url).netloc, asked
    status, answer = api_predict(rest_port, png, path=url.path)
    assert status == 200, answer
    assert_shows(shows, answer["predictions"][0])
    return shows


def test_a_drawing_is_read_as_the_api_reads_its_png(page, server, tmp_path):
    shows = draw_and_compare_with_the_api(page, server.rest_port)
    assert shows["message"] == "From your drawing:"
    page.save_screenshot(str(tmp_path / "drawing-page.png"))


def test_the_canvas_is_sent_as_drawn_dark_ink_on_white_at_its_own_size(page):
    from PIL import Image

    draw(page, [three_stroke()])
    image = Image.open(io.BytesIO(canvas_png(page)))
    assert image.size == (PAD_SIZE, PAD_SIZE)
    grey = image.convert("L")
    histogram = grey.histogram()
    assert grey.getpixel((0, 0)) == 255 and histogram[255] > PAD_SIZE * PAD_SIZE / 2  # white paper
    assert sum(histogram[:64]) > 2000  # a thick dark stroke, not a hairline


def test_touch_and_pen_draw_too(page):
    assert ink_pixels(page) == 0
    draw(page, [[(60, 140), (140, 140), (220, 140)]], pointer="touch")
    after_touch = ink_pixels(page)
    assert after_touch > 2000
    draw(page, [[(140, 40), (140, 240)]], pointer="pen")
    assert ink_pixels(page) > after_touch


def test_clear_empties_the_canvas_and_the_answer(page):
    draw(page, [three_stroke()])
    click(page, "predict")
    assert shown(page)["answer"]
    click(page, "clear")
    assert ink_pixels(page) == 0
    assert page.execute_script("return document.getElementById('answer').hidden") is True
    click(page, "predict")
    shows = shown(page)
    assert not shows["answer"] and "draw a digit first" in shows["error"]


def test_an_mnist_png_file_is_read_as_the_api_reads_it(page, server, mnist_png_bytes, tmp_path):
    from selenium.webdriver.common.by import By

    png, _ = mnist_png_bytes[0]
    path = tmp_path / "mnist-digit.png"
    path.write_bytes(png)
    page.find_element(By.ID, "file").send_keys(str(path))
    shows = shown(page)
    status, answer = api_predict(server.rest_port, png)
    assert status == 200
    assert_shows(shows, answer["predictions"][0])
    assert shows["message"] == "From mnist-digit.png:"
    assert page.execute_script("return document.getElementById('preview').hidden") is False


def test_a_file_that_is_no_image_gets_the_servers_error_in_words(page, server, tmp_path):
    from selenium.webdriver.common.by import By

    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not an image")
    page.find_element(By.ID, "file").send_keys(str(path))
    shows = shown(page)
    status, answer = api_predict(server.rest_port, path.read_bytes())
    assert status == 400
    assert not shows["answer"]
    assert shows["error"] == f"The model server could not read this image: {answer['error']}"
    assert all(bar["text"] == "–" for bar in shows["bars"])


def test_the_buttons_work_from_the_keyboard_with_a_visible_focus(page):
    from selenium.webdriver.common.keys import Keys

    draw(page, [three_stroke()])
    body = page.switch_to.active_element
    for _ in range(10):
        body.send_keys(Keys.TAB)
        body = page.switch_to.active_element
        if body.get_attribute("id") == "predict":
            break
    assert body.get_attribute("id") == "predict"
    assert body.value_of_css_property("outline-style") != "none"
    body.send_keys(Keys.ENTER)
    assert shown(page)["answer"]
    assert page.execute_script("return document.getElementById('status').getAttribute('aria-live')") == "polite"


def test_the_page_fits_a_phone_screen(page):
    try:
        page.set_window_size(390, 844)
        sizes = page.execute_script("""return {scroll: document.documentElement.scrollWidth, view: innerWidth,
                                              pad: document.getElementById('pad').getBoundingClientRect().width}""")
        assert sizes["scroll"] <= sizes["view"]
        assert 250 <= sizes["pad"] <= sizes["view"]
        draw(page, [three_stroke()], pointer="touch")
        assert ink_pixels(page) > 2000
    finally:
        page.set_window_size(*WINDOW)


def test_a_stopped_server_is_reported_in_words(browser, serve):
    """The server the page came from stops (what SIGTERM does, tests/test_server_cli.py): its listening socket
    and the browser's kept-alive connection close with it."""
    running = serve()
    open_page(browser, f"http://127.0.0.1:{running.rest_port}/")
    draw(browser, [three_stroke()])
    running.stop(grace_seconds=1)
    click(browser, "predict")
    shows = shown(browser)
    assert not shows["answer"]
    assert shows["error"].startswith("Could not reach the model server")


def test_the_page_reaches_nothing_but_its_own_origin(page, server):
    """Everything the page loads and asks comes from the server it came from, and its Content-Security-Policy
    makes the browser refuse another origin: here the same server, named localhost instead of 127.0.0.1."""
    from selenium.common.exceptions import TimeoutException

    draw(page, [three_stroke()])
    click(page, "predict")
    assert shown(page)["answer"]
    requested = resources(page)
    assert {"script", "link", "fetch"} <= {r["kind"] for r in requested}, requested
    assert {urlsplit(r["url"]).netloc for r in requested} == {f"127.0.0.1:{server.rest_port}"}, requested
    page.set_script_timeout(WAIT_SECONDS)
    try:
        refused = page.execute_async_script("""
            const [url, done] = arguments;
            document.addEventListener("securitypolicyviolation",
                                      (e) => done({directive: e.effectiveDirective, blocked: e.blockedURI}));
            fetch(url, {mode: "no-cors"}).catch(() => {});""", f"http://localhost:{server.rest_port}/v1/models/mnist")
    except TimeoutException:
        pytest.fail("the page's policy did not refuse a request to another origin")
    assert refused["directive"] == "connect-src", refused
    assert refused["blocked"].startswith(f"http://localhost:{server.rest_port}"), refused


# --- nginx in front of the embedded server (web/nginx.conf) ----------------------------------------------

def test_nginx_serves_the_page_and_not_its_own_config(nginx):
    status, content_type, body = http_get(nginx, "/")
    assert status == 200 and content_type.startswith("text/html")
    assert body == (WEB_DIR / "index.html").read_bytes()
    for name in ("app.js", "style.css"):
        status, _, body = http_get(nginx, f"/{name}")
        assert status == 200 and body == (WEB_DIR / name).read_bytes()
    assert http_get(nginx, "/nginx.conf")[0] == 404
    assert http_get(nginx, "/../serving/rest.py")[0] in (400, 404)


def test_nginx_proxies_the_rest_api(nginx, server, mnist_png_bytes):
    png, _ = mnist_png_bytes[1]
    assert api_predict(nginx, png) == api_predict(server.rest_port, png)
    status, _, body = http_get(nginx, "/v1/models/mnist")
    assert status == 200 and json.loads(body)["model_version_status"][0]["state"] == "AVAILABLE"
    # A 2 MB request passes nginx (client_max_body_size) and gets the model server's own answer.
    status, answer = api_predict(nginx, b"\0" * (2 * 1024 * 1024))
    assert status == 400 and "error" in answer


def test_the_page_through_nginx_reads_a_drawing_as_the_api(browser, nginx, server):
    open_page(browser, f"http://127.0.0.1:{nginx}/")
    draw_and_compare_with_the_api(browser, server.rest_port)


def test_the_page_through_nginx_says_when_tf_serving_is_down(browser, tmp_path):
    with running_nginx(tmp_path, upstream_port=free_port()) as port:  # nothing listens upstream
        open_page(browser, f"http://127.0.0.1:{port}/")
        draw(browser, [three_stroke()])
        click(browser, "predict")
        shows = shown(browser)
    assert not shows["answer"]
    assert shows["error"] == "The model server is not available (HTTP 502). Try again later."


# --- the README's screenshot --------------------------------------------------------------------------------

def save_screenshot(model_base_path: str, out: str) -> None:
    """Draws a "3" on the page served with the given model, asks for a prediction, saves the page as PNG."""
    from tests.test_server_support import start_test_server

    running = start_test_server(Path(model_base_path))
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    driver = start_browser(profile)
    try:
        open_page(driver, f"http://127.0.0.1:{running.rest_port}/")
        draw(driver, [three_stroke()])
        click(driver, "predict")
        shown(driver)
        driver.save_screenshot(out)
    finally:
        driver.quit()
        running.stop(grace_seconds=1)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    save_screenshot(*sys.argv[1:3])
