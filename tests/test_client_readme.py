"""README.rst's Python client example runs as written (against this test's cluster instead of
scripts/dev-cluster: only its addresses and secret are replaced)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.support.node import run_process

# starts processes: not part of the fast suite (-m "not slow")
pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parent.parent / "README.rst"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"\n(    from twisted\.internet import defer, task\n.*?\n    task\.react\(.*?\)\n)", text, re.S)
    assert found, "README.rst lost its Python client example"
    lines = [line[4:] for line in found.group(1).splitlines()]
    assert len(lines) <= 20, "the example is meant to fit in 20 lines"
    return "\n".join(lines) + "\n"


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
        exit_code, output = await run_process([sys.executable, str(path)], 30)
        assert exit_code == 0, output
        assert f"#{run} alice -> bob: hello from Python" in output, output
        assert output.strip().endswith("'hello from Python']"), output
