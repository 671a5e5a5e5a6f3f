"""bench/faults.py runs end to end at a tiny size and prints its table and JSON (not a benchmark)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
def test_faults_bench_tiny_run_prints_table_and_writes_json(tmp_path):
    """A broken bench/faults.py would leave the recovery timings in the docs without a way to re-measure them."""
    out = tmp_path / "faults.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=380, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    faults = ("broker-restart", "redis-restart", "gateway-amqp-cut")
    for name in faults:
        assert f"\n{name} " in proc.stdout, proc.stdout
    data = json.loads(out.read_text())
    assert [r["fault"] for r in data["results"]] == list(faults)
    for r in data["results"]:
        assert r["messages"] > 0 and r["pairs"] >= r["lost"] >= 0, r
        assert r["report"]["mismatched"] == 0, r
    assert len(data["rabbit_start_s"]) == 2  # started, and started again by the broker restart
