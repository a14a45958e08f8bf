"""The drawing page's files: served by the embedded server (serving/static.py, --static_dir), self-contained,
and wired into docker-compose.yml's `web` service (nginx) consistently with web/nginx.conf.

The page in a real browser, and nginx really running that config, are tests/test_web_page.py.
"""

from __future__ import annotations

import http.client
import re
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin, urlsplit

import pytest
import yaml

from serving.rest import MAX_BODY_BYTES
from serving.server import parse_args
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


class Page(HTMLParser):
    """A page's elements as a browser's parser sees them: (tag, attributes) in document order."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))

    def find(self, tag: str | None = None, **attributes: str) -> list[dict[str, str]]:
        """The attributes of every element of that tag (any tag if None) whose attributes include these
        (underscores in the names stand for dashes, http_equiv for http-equiv; for_ is for)."""
        wanted = {name.rstrip("_").replace("_", "-"): value for name, value in attributes.items()}
        return [attrs for t, attrs in self.elements
                if (tag is None or t == tag) and all(attrs.get(k, "").lower() == v.lower() for k, v in wanted.items())]


@pytest.fixture(scope="module")
def server(embedded_server):
    """The embedded server with its default --static_dir, the repository's web/."""
    return embedded_server


@pytest.fixture(scope="module")
def page(server) -> Page:
    """The page as the server serves it at /."""
    status, content_type, body = get(server.rest_port, "/")
    assert status == 200 and content_type.startswith("text/html")
    return Page(body.decode())


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


def test_an_empty_static_dir_serves_no_page(serve):
    running = serve(static_dir="")
    assert get(running.rest_port, "/")[0] == 404
    assert get(running.rest_port, "/index.html")[0] == 404
    assert get(running.rest_port, "/v1/models/mnist")[0] == 200


def test_a_missing_static_dir_is_refused_before_anything_starts(tmp_path, serve):
    with pytest.raises(ValueError, match="static_dir"):
        serve(tmp_path, static_dir=str(tmp_path / "missing"))


# --- the page itself, as served (what it does in a browser: tests/test_web_page.py) ----------------------------

def test_the_page_loads_its_script_and_style_from_the_server_that_serves_it(server, page):
    page_url = f"http://127.0.0.1:{server.rest_port}/"
    parts = [(attrs["src"], "text/javascript") for attrs in page.find("script") if "src" in attrs]
    parts += [(attrs["href"], "text/css") for attrs in page.find("link", rel="stylesheet")]
    assert {kind for _, kind in parts} == {"text/javascript", "text/css"}, parts
    for reference, kind in parts:
        url = urlsplit(urljoin(page_url, reference))
        assert f"{url.scheme}://{url.netloc}/" == page_url, reference  # this origin, not another host
        status, content_type, _ = get(server.rest_port, url.path)
        assert status == 200 and content_type.split(";")[0] == kind, reference


def test_the_pages_policy_lets_it_reach_nothing_but_its_own_origin(page):
    """The page's Content-Security-Policy: whatever its script or style asks for, the browser refuses other
    hosts (tests/test_web_page.py sees it refuse one)."""
    [policy] = page.find("meta", http_equiv="Content-Security-Policy")
    directives = {}
    for directive in policy["content"].split(";"):
        if directive.strip():
            name, *sources = directive.split()
            directives[name.lower()] = set(sources)
    assert directives["default-src"] == {"'none'"}  # what is not listed is refused
    assert directives["connect-src"] == {"'self'"}  # the REST API is asked on this origin
    for name, sources in directives.items():
        assert sources <= {"'none'", "'self'", "data:", "blob:"}, (name, sources)  # no host, no 'unsafe-*'


def test_the_page_is_accessible(page):
    assert page.find(aria_live="polite") and page.find(role="alert")  # answers and errors are announced
    for button in ("predict", "clear"):
        assert page.find("button", id=button, type="button"), button  # a real button, not a submit
    [file_input] = page.find("input", type="file")
    assert page.find("label", for_=file_input["id"])
    assert page.find("meta", name="viewport")


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
    assert "tf-serving" in compose["services"]
    [api] = re.findall(r"^\s*location\s+/v1/\s*\{([^}]*)\}", nginx_conf, re.MULTILINE)
    upstream = directive(api, "proxy_pass").removeprefix("http://")
    [servers] = re.findall(rf"^\s*upstream\s+{upstream}\s*\{{([^}}]*)\}}", nginx_conf, re.MULTILINE)
    assert directive(servers, "server") == f"tf-serving:{rest_port}"
    size = directive(nginx_conf, "client_max_body_size")
    assert size.endswith("m") and int(size[:-1]) * 1024 * 1024 >= MAX_BODY_BYTES
