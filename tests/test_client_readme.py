"""README.rst's Python client example runs as written (against this test's cluster instead of
scripts/dev-cluster: only its addresses and secret are replaced)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor

README = Path(__file__).resolve().parent.parent / "README.rst"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"\n(    from twisted\.internet import defer, task\n.*?\n    task\.react\(.*?\)\n)", text, re.S)
    assert found, "README.rst lost its Python client example"
    lines = [line[4:] for line in found.group(1).splitlines()]
    assert len(lines) <= 20, "the example is meant to fit in 20 lines"
    return "\n".join(lines) + "\n"


class Script(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:  # noqa: N802
        self.ended.callback(reason.value.exitCode)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_readme_python_example_runs(cluster, tmp_path):
    """A reader copying the README's client example would get an error instead of a chat."""
    code = readme_example()
    for dev in ("ws://127.0.0.1:8080/ws", "tcp://127.0.0.1:8081", '"dev-secret"'):
        assert dev in code
    gw, _ = await defer.gatherResults([cluster.start_gateway(), cluster.start_processor()])
    code = (code.replace("ws://127.0.0.1:8080/ws", gw.ws_url)
            .replace("tcp://127.0.0.1:8081", f"tcp://127.0.0.1:{gw.tcp_port}")
            .replace('"dev-secret"', repr(cluster.jwt_secret)))
    path = tmp_path / "example.py"
    path.write_text(code, encoding="utf-8")
    for run in (1, 2):  # the second run finds the first one's messages
        script = Script()
        reactor.spawnProcess(script, sys.executable, [sys.executable, str(path)], env=None)
        exit_code = await script.ended.addTimeout(30, reactor)
        output = script.output.decode("utf-8", "replace")
        assert exit_code == 0, output
        assert f"#{run} alice -> bob: hello from Python" in output, output
        assert output.strip().endswith("'hello from Python']"), output
