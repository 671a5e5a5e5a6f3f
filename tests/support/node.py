"""Node packages of the tests that drive JavaScript (the browser test, the bench generator)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


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
