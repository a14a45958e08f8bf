"""The drawing page's files: served by the embedded server (serving/static.py, --static_dir), self-contained,
and wired into docker-compose.yml's `web` service (nginx) consistently with web/nginx.conf.

The page in a real browser, and nginx really running that config, are tests/test_web_page.py.
"""

from __future__ import annotations

import http.client
import re
from pathlib import Path, PurePosixPath

import pytest
import yaml

from serving.rest import MAX_BODY_BYTES
from serving.server import ServerOptions, parse_args, start_server
from serving.static import DEFAULT_STATIC_DIR, StaticFiles

ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = ROOT / "web"
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


def get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)  # the path goes out exactly as written
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def serve(model_base_path: Path, static_dir: str):
    return start_server(ServerOptions(host="127.0.0.1", port=0, rest_api_port=0, model_name="mnist",
                                      model_base_path=str(model_base_path), file_system_poll_wait_seconds=0,
                                      static_dir=static_dir))


@pytest.fixture(scope="module")
def server(model_base_path):
    running = serve(model_base_path, DEFAULT_STATIC_DIR)
    yield running
    running.stop(grace_seconds=1)


# --- the embedded server -------------------------------------------------------------------------------------

def test_the_default_static_dir_is_the_repositorys_web_dir():
    assert Path(DEFAULT_STATIC_DIR) == WEB_DIR
    assert parse_args([]).static_dir == DEFAULT_STATIC_DIR
    assert parse_args(["--static_dir="]).static_dir == ""
    assert parse_args(["--static_dir", "/srv/page"]).static_dir == "/srv/page"


def test_the_page_is_served_at_the_root_with_its_content_types(server):
    for path, name in [("/", "index.html"), ("/index.html", "index.html"), ("/app.js", "app.js"),
                       ("/style.css", "style.css"), ("/app.js?v=2", "app.js")]:
        status, content_type, body = get(server.rest_port, path)
        assert status == 200, path
        assert content_type.split(";")[0] == PAGE_FILES[name]
        assert body == (WEB_DIR / name).read_bytes()


@pytest.mark.parametrize("path", [
    "/../serving/rest.py", "/%2e%2e/serving/rest.py", "/..%2fserving%2frest.py", "/web/../../etc/passwd",
    "//etc/passwd", "/nginx.conf", "/.hidden.html", "/%00.html", "/%ff.html", "/missing.html", "/..",
    "/web", "/index.html%5c..%5c..%5cREADME.md",
])
def test_nothing_else_is_served(server, path):
    status, content_type, body = get(server.rest_port, path)
    assert status == 404, body
    assert content_type == "application/json" and b'"error"' in body


def test_the_rest_api_is_unchanged_beside_the_page(server):
    status, _, body = get(server.rest_port, "/v1/models/mnist")
    assert status == 200 and b"AVAILABLE" in body
    assert get(server.rest_port, "/v1/index.html")[0] == 404


def test_files_outside_the_dir_are_refused_even_through_a_symlink(tmp_path):
    page = tmp_path / "page"
    page.mkdir()
    (page / "index.html").write_text("<p>hi</p>")
    (tmp_path / "secret.html").write_text("secret")
    (page / "leak.html").symlink_to(tmp_path / "secret.html")
    (page / "sub").mkdir()
    (page / "sub" / "a.css").write_text("p {}")
    files = StaticFiles(page)
    assert files.lookup("/").body == b"<p>hi</p>"
    assert files.lookup("/sub/a.css").content_type.startswith("text/css")
    assert files.lookup("/leak.html") is None
    assert files.lookup("/sub") is None
    assert files.lookup("/sub/../../secret.html") is None
    with pytest.raises(ValueError, match="not a directory"):
        StaticFiles(tmp_path / "missing")


def test_an_empty_static_dir_serves_no_page(model_base_path):
    running = serve(model_base_path, "")
    try:
        assert get(running.rest_port, "/")[0] == 404
        assert get(running.rest_port, "/index.html")[0] == 404
        assert get(running.rest_port, "/v1/models/mnist")[0] == 200
    finally:
        running.stop(grace_seconds=1)


def test_a_missing_static_dir_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="static_dir"):
        start_server(ServerOptions(model_base_path=str(tmp_path), static_dir=str(tmp_path / "missing")))


# --- the page itself --------------------------------------------------------------------------------------------

def test_the_page_loads_nothing_from_other_hosts():
    for name in PAGE_FILES:
        text = (WEB_DIR / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), name
        assert "@import" not in text
    html = (WEB_DIR / "index.html").read_text()
    assert "Content-Security-Policy" in html and "connect-src 'self'" in html and "default-src 'none'" in html


def test_the_page_asks_the_rest_api_and_is_accessible():
    script = (WEB_DIR / "app.js").read_text()
    assert 'const PREDICT_URL = "v1/models/mnist:predict";' in script
    html = (WEB_DIR / "index.html").read_text()
    assert 'aria-live="polite"' in html and 'role="alert"' in html
    assert '<button type="button" id="predict"' in html and '<button type="button" id="clear"' in html
    assert '<label for="file">' in html and 'name="viewport"' in html


# --- docker-compose.yml's `web` service and web/nginx.conf ----------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def nginx_conf() -> str:
    return (WEB_DIR / "nginx.conf").read_text()


def directive(conf: str, name: str) -> str:
    [value] = re.findall(rf"^\s*{name}\s+([^;{{}}\n]+);", conf, re.MULTILINE)
    return value.strip()


def test_web_service_runs_a_pinned_official_nginx(compose):
    web = compose["services"]["web"]
    image, _, tag = web["image"].partition(":")
    assert image == "nginx"
    assert re.fullmatch(r"\d+\.\d+\.\d+-alpine", tag), f"pin an exact release, not {tag!r}"
    assert web["ports"] == ["8080:80"]
    assert web["depends_on"]["tf-serving"]["condition"] == "service_healthy"
    assert web["restart"] == "unless-stopped"


def test_web_service_mounts_the_page_and_the_config_read_only(compose, nginx_conf):
    mounts = {}
    for volume in compose["services"]["web"]["volumes"]:
        source, target, mode = volume.split(":")
        assert source.startswith("./") and mode == "ro", volume
        assert (ROOT / source).exists(), volume
        mounts[PurePosixPath(target)] = ROOT / source
    assert mounts[PurePosixPath("/etc/nginx/conf.d/default.conf")] == WEB_DIR / "nginx.conf"
    root = PurePosixPath(directive(nginx_conf, "root"))
    assert mounts[root] == WEB_DIR
    assert directive(nginx_conf, "listen") == "80"


def test_nginx_proxies_the_api_to_the_tf_serving_service(compose, nginx_conf):
    tf_serving = compose["services"]["tf-serving"]
    rest_port = next(arg.split("=")[1] for arg in tf_serving["command"] if arg.startswith("--rest_api_port="))
    assert directive(nginx_conf, "server") == f"tf-serving:{rest_port}"
    assert "tf-serving" in compose["services"]
    assert re.search(r"location /v1/ \{\s*proxy_pass http://tf_serving;", nginx_conf)
    size = directive(nginx_conf, "client_max_body_size")
    assert size.endswith("m") and int(size[:-1]) * 1024 * 1024 >= MAX_BODY_BYTES
