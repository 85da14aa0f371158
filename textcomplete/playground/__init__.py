"""The playground: a static page at `/` and `/playground` that drives this server's own `/v1/completions`.

Plain HTML, CSS and JavaScript modules shipped in the package: no build step, nothing fetched from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

STATIC = Path(__file__).parent / "static"
PAGE_PATHS = ("/", "/playground")
ASSET_PREFIX = "/playground/"
# The page may load only its own files and talk only to this server: no CDN, and the API key it keeps in the
# browser cannot be sent to another origin.
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
_ASSETS = {p.name: p for p in STATIC.iterdir() if p.suffix in {".js", ".css", ".svg"}}


def is_page_path(path: str) -> bool:
    """Whether `path` is the page or one of its files: they are served without an API key (the page asks for
    the key and sends it with its API calls)."""
    return path in PAGE_PATHS or path.startswith(ASSET_PREFIX)


async def _page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


async def _asset(request: Request) -> Response:
    path = _ASSETS.get(request.path_params["name"])
    if path is None:   # only the shipped files, by name: no path from the URL reaches the file system
        raise HTTPException(404)
    return FileResponse(path, headers=HEADERS)


def routes() -> list[Route]:
    return [Route(p, _page, methods=["GET"]) for p in PAGE_PATHS] + [
        Route(ASSET_PREFIX + "{name}", _asset, methods=["GET"])]
