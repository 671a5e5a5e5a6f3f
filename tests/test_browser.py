"""The web chat in a real browser, and imcluster.js's own rules, run with Node.

``tests/browser/chat.e2e.mjs`` drives Debian's Chromium (``/usr/bin/chromium``)
with Playwright (``playwright-core`` from npm, installed by
``npm ci --prefix tests/browser``; no browser is downloaded) against a real
cluster: two gateways, a processor and ``twistd imapi --dev-login`` serving
the page. The screenshots stay in ``build/artifacts/browser/`` (or
``$IMTEST_ARTIFACTS``).

Skipped only when Node or Chromium is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import Agent, readBody

from imcluster.protocol import CLIENT_TYPES
from tests.support.node import ensure_npm_packages, run_process

# starts processes: not part of the fast suite (-m "not slow")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM = os.environ.get("IMTEST_CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")
ARTIFACTS = Path(os.environ.get("IMTEST_ARTIFACTS", ROOT / "build" / "artifacts" / "browser"))
E2E_TIMEOUT = 120.0

needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed (apt-get install nodejs)")
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                    reason=f"{CHROMIUM} is missing (apt-get install chromium)")


def run_node(args: list[str], env: dict[str, str], timeout: float) -> defer.Deferred:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
    full_env.update(env)
    return run_process([NODE, *args], timeout, env=full_env, path=str(BROWSER_DIR))


@needs_node
@pytest_twisted.ensureDeferred
async def test_imcluster_js_rules():
    """The browser client would lose, duplicate or misorder messages across reconnects."""
    code, output = await run_node(["--test", "client.test.mjs"], {}, 60)
    assert code == 0, output
    assert "# fail 0" in output, output


async def http_get(url: str) -> tuple[int, bytes]:
    response = await Agent(reactor).request(b"GET", url.encode())
    return response.code, await readBody(response)


@needs_node
@needs_chromium
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_web_chat_in_chromium(cluster):
    """Two people on two gateways could not chat in the web page, or a reload would lose the read state."""
    ensure_npm_packages(BROWSER_DIR, "playwright-core")
    gw1, gw2, _ = await defer.gatherResults(
        [cluster.start_gateway(), cluster.start_gateway(), cluster.start_processor()])
    api = await cluster.start_api(dev_login=True, public_ws_urls=[gw1.ws_url, gw2.ws_url])
    app = f"http://127.0.0.1:{api.http_port}/app/"
    status, body = await http_get(app + "config.json")
    assert status == 200, (
        "imapi does not serve the web chat at /app/: its root must be imcluster.api.webapp.mount(api, config)")
    assert b"devLogin\":true" in body
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    code, output = await run_node(["chat.e2e.mjs"], {
        "IMTEST_APP_URL": app, "IMTEST_WS_A": gw1.ws_url, "IMTEST_WS_B": gw2.ws_url,
        "IMTEST_ARTIFACTS": str(ARTIFACTS), "CHROMIUM": CHROMIUM,
    }, E2E_TIMEOUT)
    assert code == 0, f"{output}\n(screenshots in {ARTIFACTS})"
    assert (ARTIFACTS / "chat-desktop.png").stat().st_size > 10_000
    assert (ARTIFACTS / "chat-phone.png").stat().st_size > 10_000


@needs_node
@needs_chromium
@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_web_chat_over_sse_when_websocket_is_blocked(cluster):
    """A browser whose WebSocket is blocked (or whose event streams are buffered) could not chat."""
    ensure_npm_packages(BROWSER_DIR, "playwright-core")
    gw1, gw2, _ = await defer.gatherResults(
        [cluster.start_gateway(), cluster.start_gateway(), cluster.start_processor()])
    stream_a = f"http://127.0.0.1:{gw1.stream_port}"
    api = await cluster.start_api(dev_login=True, public_ws_urls=[gw1.ws_url, gw2.ws_url],
                                  public_stream_urls=[stream_a])
    app = f"http://127.0.0.1:{api.http_port}/app/"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("stream-*.png"):
        old.unlink()
    code, output = await run_node(["stream.e2e.mjs"], {
        "IMTEST_APP_URL": app, "IMTEST_WS_A": gw1.ws_url, "IMTEST_WS_B": gw2.ws_url, "IMTEST_STREAM_A": stream_a,
        "IMTEST_ARTIFACTS": str(ARTIFACTS), "CHROMIUM": CHROMIUM,
    }, E2E_TIMEOUT)
    assert code == 0, f"{output}\n(screenshots in {ARTIFACTS})"
    assert (ARTIFACTS / "stream-desktop.png").stat().st_size > 10_000
    assert (ARTIFACTS / "poll-phone.png").stat().st_size > 10_000


@needs_node
@needs_chromium
@pytest.mark.slow
@pytest.mark.skipif("recall" not in CLIENT_TYPES, reason="the server side of PROTOCOL.md 1.1 is not in this tree yet")
@pytest_twisted.ensureDeferred
async def test_web_chat_conversation_features_in_chromium(cluster):
    """People on two gateways would miss live presence, delivered marks, typing, recall, edit and
    membership notices in the page; a 70,000-character message would block all sending and be lost;
    the unread badge would count twice after a new login; a phone would not show its lost connection."""
    ensure_npm_packages(BROWSER_DIR, "playwright-core")
    gw1, gw2, _ = await defer.gatherResults(
        [cluster.start_gateway(), cluster.start_gateway(), cluster.start_processor()])
    api = await cluster.start_api(dev_login=True, public_ws_urls=[gw1.ws_url, gw2.ws_url])
    app = f"http://127.0.0.1:{api.http_port}/app/"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in [*ARTIFACTS.glob("features-*.png"), *ARTIFACTS.glob("phone-offline.png")]:
        old.unlink()
    code, output = await run_node(["features.e2e.mjs"], {
        "IMTEST_APP_URL": app, "IMTEST_WS_A": gw1.ws_url, "IMTEST_WS_B": gw2.ws_url,
        "IMTEST_ARTIFACTS": str(ARTIFACTS), "CHROMIUM": CHROMIUM,
        # typing and live presence steps only with a server that has them
        "IMTEST_LIVE": "1" if {"typing", "presence_subscribe"} <= CLIENT_TYPES else "0",
    }, E2E_TIMEOUT + 60)
    assert code == 0, f"{output}\n(screenshots in {ARTIFACTS})"
    for name in ("features-desktop.png", "features-phone.png", "phone-offline.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000, name
