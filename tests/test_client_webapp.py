"""imapi's web chat resources (imcluster.api.webapp) over real HTTP, in front of a stand-in API."""

from __future__ import annotations

import configparser
import fnmatch
import json
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import resource
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from imcluster.api.resources import make_site
from imcluster.api.webapp import STATIC_DIR, mount
from imcluster.auth import JWTAuthenticator
from imcluster.config import API, ConfigError, load_config

SECRET = "webapp-test-secret-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


class StandInAPI(resource.Resource):
    """What imapi's APIResource is to the root: a leaf that routes on request.path."""

    isLeaf = True

    def render(self, request):
        request.setResponseCode(299)
        return b"api:" + request.method + b" " + request.path


def config(**options):
    values = {"jwt_secret": SECRET, "public_ws_urls": ["ws://gw1.test:8080/ws", "wss://gw2.test/ws"],
              "public_stream_urls": ["https://gw2.test:8443"]}
    values.update(options)
    return load_config(API, values, environ={})


@pytest.fixture
def serve():
    ports = []

    async def start(cfg):
        site = make_site(mount(StandInAPI(), cfg), cfg.replace(max_body_size=1024, http_idle_timeout=10.0))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


async def request(method, url, body=None, headers=None):
    producer = FileBodyProducer(__import__("io").BytesIO(body)) if body is not None else None
    response = await Agent(reactor).request(method.encode(), url.encode(), Headers(headers or {}), producer)
    data = await readBody(response)
    return response, data


@pytest_twisted.ensureDeferred
async def test_dev_login_gives_a_token_the_gateways_accept(serve):
    """The page's development login would hand out tokens that the gateways then refuse."""
    base = await serve(config(dev_login=True, jwt_audience="imc", jwt_issuer="me", dev_login_ttl=600))
    response, data = await request("POST", base + "/v1/dev/login", b'{"userId": "alice@example.com"}',
                                   {b"content-type": [b"application/json"]})
    assert response.code == 200
    answer = json.loads(data)
    assert answer["userId"] == "alice@example.com" and answer["expiresIn"] == 600
    identity = JWTAuthenticator(secret=SECRET, audience="imc", issuer="me").authenticate(answer["token"])
    assert identity.user_id == "alice@example.com"
    for body in (b'{"userId": "bad id"}', b"not json", b'["alice"]', b'{"userId": ""}'):
        response, data = await request("POST", base + "/v1/dev/login", body)
        assert response.code == 400 and json.loads(data)["error"]["code"] == "bad_request", body
    response, _ = await request("POST", base + "/v1/dev/login", b'{"userId": "' + b"a" * 5000 + b'"}')
    assert response.code == 413
    response, data = await request("GET", base + "/v1/dev/login")
    assert response.code == 405 and json.loads(data)["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("options", [{}, {"dev_login": False}], ids=["default", "off"])
@pytest_twisted.ensureDeferred
async def test_dev_login_absent_unless_turned_on(serve, options):
    """A production imapi must never give out tokens to anyone who asks."""
    base = await serve(config(**options))
    response, data = await request("POST", base + "/v1/dev/login", b'{"userId": "alice"}')
    assert (response.code, data) == (299, b"api:POST /v1/dev/login")
    response, data = await request("GET", base + "/app/config.json")
    assert json.loads(data)["devLogin"] is False


@pytest_twisted.ensureDeferred
async def test_dev_login_needs_a_secret(serve, tmp_path):
    """With a public key there is nothing to sign tokens with: the login must stay off."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = tmp_path / "key.pem"
    pem.write_bytes(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cfg = load_config(API, {"jwt_public_key": str(pem), "dev_login": True}, environ={})
    base = await serve(cfg)
    response, _ = await request("POST", base + "/v1/dev/login", b'{"userId": "alice"}')
    assert response.code == 299


@pytest_twisted.ensureDeferred
async def test_page_and_config(serve):
    """The page would not load (types, paths), or would not know where the gateways are."""
    base = await serve(config(dev_login=True))
    response, data = await request("GET", base + "/app/")
    assert response.code == 200 and b'<script type="module" src="app.js">' in data
    assert response.headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    csp = response.headers.getRawHeaders(b"content-security-policy")[0].decode()
    assert "connect-src 'self' https://gw2.test:8443 ws://gw1.test:8080 wss://gw2.test;" in csp
    for name, kind in (("imcluster.js", b"text/javascript"), ("app.js", b"text/javascript"),
                       ("app.css", b"text/css")):
        response, data = await request("GET", f"{base}/app/{name}")
        assert response.code == 200 and data == (STATIC_DIR / name).read_bytes()
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(kind)
    response, data = await request("GET", base + "/app/config.json")
    assert json.loads(data) == {"wsUrls": ["ws://gw1.test:8080/ws", "wss://gw2.test/ws"],
                                "streamUrls": ["https://gw2.test:8443"], "devLogin": True}
    for path in ("/app", "/"):
        response, _ = await request("GET", base + path)
        assert response.code == 302 and response.headers.getRawHeaders(b"location") == [b"/app/"], path
    for path in ("/app/nope.js", "/app/../api/webapp.py", "/app/%2e%2e/api/webapp.py", "/app/config.json/x"):
        response, _ = await request("GET", base + path)
        assert response.code == 404, path
    response, data = await request("GET", base + "/v1/users/alice/sessions")
    assert (response.code, data) == (299, b"api:GET /v1/users/alice/sessions")
    response, data = await request("POST", base + "/")
    assert (response.code, data) == (299, b"api:POST /")


def test_public_ws_urls_must_be_websocket_urls():
    """A typo in the gateway URLs would only show as a page that never connects."""
    with pytest.raises(ConfigError, match="public_ws_urls"):
        config(public_ws_urls=["http://gw1/ws"])
    assert load_config(API, {"jwt_secret": SECRET}, environ={}).public_ws_urls == ["ws://127.0.0.1:8080/ws"]
    env = {"IMCLUSTER_PUBLIC_WS_URLS": "ws://a/ws,wss://b/ws", "IMCLUSTER_DEV_LOGIN": "true"}
    cfg = load_config(API, {"jwt_secret": SECRET}, environ=env)
    assert cfg.public_ws_urls == ["ws://a/ws", "wss://b/ws"] and cfg.dev_login is True


def test_public_stream_urls_must_be_http_urls():
    """A ws:// URL given as the streaming fallback would only show as a page that never falls back."""
    with pytest.raises(ConfigError, match="public_stream_urls"):
        config(public_stream_urls=["ws://gw1:8082"])
    assert load_config(API, {"jwt_secret": SECRET}, environ={}).public_stream_urls == ["http://127.0.0.1:8082"]


def test_static_files_ship_in_the_package():
    """An installed imcluster (not a checkout) would serve an empty /app/."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in parser["options.package_data"]["imcluster"].split(",")]
    for path in STATIC_DIR.iterdir():
        relative = f"static/{path.name}"
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), f"{relative} is not in package_data"
