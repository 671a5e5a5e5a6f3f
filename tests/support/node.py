"""Node packages of the tests that drive JavaScript (the browser test, the bench generator), and child processes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from twisted.internet import defer, protocol, reactor


def ensure_npm_packages(folder: Path, package: str) -> None:
    """Install ``folder``'s locked npm packages (``npm ci``) unless ``package`` is there already.

    So that README's test command also works where ``.ci/run`` did not run
    first. Fails the test with npm's output when the install fails.
    """
    if (folder / "node_modules" / package).is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"npm is missing: cannot install {folder}'s packages (apt-get install npm)")
    proc = subprocess.run([npm, "ci", "--prefix", str(folder), "--no-audit", "--no-fund", "--loglevel=error"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not (folder / "node_modules" / package).is_dir():
        pytest.fail(f"npm ci --prefix {folder} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


class _Collect(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:  # noqa: N802 (Twisted API)
        self.ended.callback((reason.value.exitCode, self.output.decode("utf-8", "replace")))


def run_process(argv: list[str], timeout: float, env: dict[str, str] | None = None,
                path: str | None = None) -> defer.Deferred:
    """Run ``argv`` without blocking the reactor; fires with (exit code, stdout + stderr).

    ``env`` None inherits this process's environment. A process still running
    after ``timeout`` seconds is killed and the test fails with its output.
    """
    proc = _Collect()
    transport = reactor.spawnProcess(proc, argv[0], argv, env=env, path=path)

    def timed_out(failure, _timeout):
        if failure.check(defer.CancelledError):
            transport.signalProcess("KILL")
            raise AssertionError(f"{' '.join(argv)} did not finish within {timeout}s:\n{proc.output.decode()}")
        return failure

    return proc.ended.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
