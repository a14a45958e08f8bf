"""The drawing page (web/) on the REST port: GET / and the files beside it, nothing outside that directory.

Only regular files directly named by the URL, inside the directory (after resolving `..` and symlinks), of a
type listed in CONTENT_TYPES, are served: no listings, no dotfiles, and not web/nginx.conf.
"""

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

DEFAULT_STATIC_DIR = str(Path(__file__).resolve().parents[1] / "web")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str


class StaticFiles:
    def __init__(self, directory: str | Path) -> None:
        self.root = Path(directory).resolve()
        if not self.root.is_dir():
            raise ValueError(f"--static_dir={directory}: not a directory")

    def lookup(self, url_path: str) -> StaticFile | None:
        """The file a GET of url_path (without the query) names, or None: the caller answers 404."""
        try:
            relative = unquote(url_path, errors="strict").lstrip("/") or "index.html"
        except UnicodeDecodeError:
            return None
        if "\0" in relative or "\\" in relative or any(part.startswith(".") for part in relative.split("/")):
            return None
        path = (self.root / relative).resolve()
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_relative_to(self.root) or not path.is_file():
            return None
        try:
            return StaticFile(path.read_bytes(), content_type)
        except OSError:
            return None
