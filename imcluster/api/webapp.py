"""The web chat that imapi serves: the page at ``/app/`` and a development login.

``/app/``
    the page (``imcluster/static/``: ``index.html``, ``app.css``, ``app.js``
    and the dependency-free ES module ``imcluster.js``), no build step.
    The page talks to imapi (same origin: sessions and unread counts,
    presence) and to the gateways over WebSocket.
``/app/config.json``
    ``{"wsUrls": [...], "streamUrls": [...], "devLogin": bool}``: the
    gateway URLs a browser reaches (options ``public_ws_urls``, and
    ``public_stream_urls`` for the HTTP streaming fallback) and whether the
    development login exists.
``POST /v1/dev/login`` ``{"userId": "alice"}`` -> ``{"token": "<JWT>", "userId", "expiresIn"}``
    DEVELOPMENT ONLY: anyone may log in as anyone. It exists only when
    ``dev_login`` is on and the tokens are HS256-signed with ``jwt_secret``
    (with ``jwt_audience``/``jwt_issuer`` when configured); otherwise the
    path is the API's ordinary 404.

imapi's :class:`~imcluster.api.resources.APIResource` routes on the whole
path as one leaf; :func:`mount` puts a small root in front of it that sends
``/app/...`` and ``/v1/dev/login`` here and everything else to the API
(``GET /`` redirects to ``/app/``)::

    site = make_site(mount(api, config), config)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.web import resource, server, static, util

from imcluster.auth import mint_token, valid_user_id
from imcluster.web import NotFound, json_bytes, write_json

#: the page's files, shipped in the package (setup.cfg package_data)
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}

#: the largest dev login body read (a user id is at most 128 characters)
DEV_LOGIN_MAX_BODY = 4096


def _error(request: Any, status: int, code: str, message: str) -> Any:
    """An error in the API's format (HTTP-API.md "Errors"); write_json finishes the request."""
    write_json(request, status, {"error": {"code": code, "message": message}})
    return server.NOT_DONE_YET


def _read_only(request: Any) -> Any:
    """The JSON 405 for a method other than GET/HEAD on the page's resources, else None."""
    if request.method in (b"GET", b"HEAD"):
        return None
    request.setHeader(b"allow", b"GET, HEAD")
    return _error(request, 405, "method_not_allowed", "the web chat's files are read with GET")


class Forbidden(resource.Resource):
    """403 in the JSON error shape (a page file the daemon may not read), not Twisted's HTML page."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        return _error(request, 403, "forbidden", "this file cannot be read")


class StaticFiles(static.File):
    """``imcluster/static`` without directory listings, with the page's security headers.

    A missing file is the API's JSON 404 and a method other than GET/HEAD
    its JSON 405 (HTTP-API.md "Errors": every error has that shape), not
    Twisted's HTML pages.
    """

    contentTypes = dict(static.File.contentTypes, **CONTENT_TYPES)
    childNotFound = NotFound()
    forbidden = Forbidden()
    #: the Content-Security-Policy header (set by WebApp; passed on to each file)
    csp = "default-src 'self'"

    def render(self, request: Any) -> Any:
        return _read_only(request) or super().render(request)

    def getChild(self, path: bytes, request: Any) -> resource.Resource:  # noqa: N802 (Twisted API)
        # Twisted passes a NUL on to the file system (ValueError: a 500 with a traceback) and logs a
        # traceback for a segment that is not UTF-8: no file of the page has such a name
        if not _plain_file_name(path):
            return NotFound()
        return super().getChild(path, request)

    def createSimilarFile(self, path: str) -> "StaticFiles":  # noqa: N802 (Twisted API)
        f = super().createSimilarFile(path)
        f.csp = self.csp
        return f

    def directoryListing(self) -> resource.Resource:  # noqa: N802 (Twisted API)
        return NotFound()

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (Twisted API)
        # a new version of the page is picked up at once (it is small and served locally)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"content-security-policy", self.csp.encode("ascii"))
        return super().render_GET(request)


class ConfigJSON(resource.Resource):
    """``/app/config.json``: what the page needs to know about this cluster."""

    isLeaf = True

    def __init__(self, ws_urls: list[str], dev_login: bool, stream_urls: list[str] = ()) -> None:
        super().__init__()
        self.body = json_bytes({"wsUrls": list(ws_urls), "streamUrls": list(stream_urls),
                                "devLogin": bool(dev_login)})

    def render(self, request: Any) -> Any:
        return _read_only(request) or super().render(request)

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (Twisted API)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return self.body


class WebApp(resource.Resource):
    """``/app/``: the static page plus ``config.json``."""

    def __init__(self, ws_urls: list[str], dev_login: bool, static_dir: Path = STATIC_DIR,
                 stream_urls: list[str] = ()) -> None:
        super().__init__()
        sources = " ".join(sorted({_origin(u) for u in [*ws_urls, *stream_urls]}))
        csp = (f"default-src 'self'; connect-src 'self' {sources}; img-src 'self' data:; "
               "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'")
        self.files = StaticFiles(str(static_dir))
        self.files.csp = csp
        self.config = ConfigJSON(ws_urls, dev_login, stream_urls)

    def getChild(self, name: bytes, request: Any) -> resource.Resource:  # noqa: N802 (Twisted API)
        if name == b"config.json" and not request.postpath:
            return self.config
        if name == b"":
            name = b"index.html"
        return self.files.getChildWithDefault(name, request)

    def render(self, request: Any) -> Any:
        return _read_only(request) or super().render(request)

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 (Twisted API)
        # "/app" without its slash: relative links in the page need it
        return util.redirectTo(b"/app/", request)


#: the longest file name a page file may have (file systems allow 255 bytes)
MAX_FILE_NAME = 255


def _plain_file_name(name: bytes) -> bool:
    """True for a path segment that could name one of the page's files (UTF-8, no NUL, no separator)."""
    if not name or len(name) > MAX_FILE_NAME or b"\x00" in name or b"/" in name or b"\\" in name:
        return False
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _origin(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class DevLogin(resource.Resource):
    """``POST /v1/dev/login``: a token for any user (development only; see the module docstring)."""

    isLeaf = True
    log = Logger()

    def __init__(self, secret: str, ttl: float, audience: str | None = None, issuer: str | None = None) -> None:
        super().__init__()
        self.secret = secret
        self.ttl = ttl
        self.claims = {"aud": audience, "iss": issuer}

    def render(self, request: Any) -> Any:
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return _error(request, 405, "method_not_allowed", "use POST with {\"userId\": ...}")
        return super().render(request)

    def render_POST(self, request: Any) -> Any:  # noqa: N802 (Twisted API)
        if getattr(request, "body_too_large", False):
            return _error(request, 413, "too_large", "the body is too large")
        request.content.seek(0)
        raw = request.content.read(DEV_LOGIN_MAX_BODY + 1)
        if len(raw) > DEV_LOGIN_MAX_BODY:
            return _error(request, 413, "too_large", "the body is too large")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return _error(request, 400, "bad_request", "the body must be JSON: {\"userId\": \"alice\"}")
        user = body.get("userId") if isinstance(body, dict) else None
        if not valid_user_id(user):
            return _error(request, 400, "bad_request", "userId must be 1-128 characters of A-Z a-z 0-9 _ . @ -")
        token = mint_token(self.secret, user, self.ttl, **self.claims)
        self.log.info("development login as {user}", user=user)
        write_json(request, 200, {"token": token, "userId": user, "expiresIn": int(self.ttl)})
        return server.NOT_DONE_YET


class Root(resource.Resource):
    """imapi's root: ``/app/`` and the dev login here, everything else to the API (a leaf)."""

    def __init__(self, api: resource.Resource, app: WebApp, dev_login: DevLogin | None) -> None:
        super().__init__()
        self.api = api
        self.app = app
        self.dev_login = dev_login

    def getChildWithDefault(self, name: bytes, request: Any) -> resource.Resource:  # noqa: N802
        if name == b"app":
            return self.app
        if name == b"" and not request.postpath and request.method in (b"GET", b"HEAD"):
            return util.Redirect(b"/app/")
        if (self.dev_login is not None and name == b"v1"
                and [p for p in request.postpath] == [b"dev", b"login"]):
            request.prepath += request.postpath
            request.postpath = []
            return self.dev_login
        # the API routes on request.path itself; traversal stops at it (isLeaf)
        return self.api


def mount(api: resource.Resource, config: Any) -> Root:
    """imapi's root resource: ``api`` plus the web chat (and the dev login when it is on)."""
    log = Logger(namespace="imcluster.api.webapp")
    values = config.values
    dev = None
    if values.get("dev_login"):
        if values.get("jwt_secret"):
            dev = DevLogin(values["jwt_secret"], values.get("dev_login_ttl", 86400.0),
                           values.get("jwt_audience"), values.get("jwt_issuer"))
            log.warn("DEVELOPMENT LOGIN IS ON: POST /v1/dev/login gives anyone a token for any user; "
                     "never turn dev_login on in production")
        else:
            log.error("dev_login needs jwt_secret (tokens verified with a public key cannot be minted "
                      "here); the development login stays off")
    app = WebApp(values.get("public_ws_urls") or ["ws://127.0.0.1:8080/ws"], dev is not None,
                 stream_urls=values.get("public_stream_urls", []))
    return Root(api, app, dev)
