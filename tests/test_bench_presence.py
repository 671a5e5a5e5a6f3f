"""The presence and typing benchmarks run end to end at a tiny size and print sane figures (not benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_presence_bench_tiny(tmp_path):
    """The figures issue 16 asks for must come out of bench/presence.py, and be consistent."""
    out = tmp_path / "presence.json"
    proc = subprocess.run([sys.executable, str(BENCH / "presence.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    assert "redis_bytes_per_transition" in proc.stdout
    assert figures["same_state_repeats"] == 0 and figures["errors"] == 0
    assert figures["redis_publish"] == figures["transitions"] == 2 * figures["flappers"]
    assert figures["webhook_events"] == figures["transitions"]
    assert 0 < figures["presence_frames"] <= figures["presence_frames_expected_at_most"]
    assert figures["delay_max_ms"] < 5000


def test_typing_bench_tiny(tmp_path):
    """bench/typing_cost.py must show the gateway dropping all but one typing a second per session."""
    out = tmp_path / "typing.json"
    proc = subprocess.run([sys.executable, str(BENCH / "typing_cost.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    assert figures["errors"] == 0
    sessions = figures["senders"] * figures["sessions_each"]
    # one a second per session (plus the first of the window), not one per 0.25 s
    assert sessions * (figures["seconds"] - 1) <= figures["typing_delivered"] <= sessions * (figures["seconds"] + 2)
    assert figures["dropped_at_gateway"] > figures["typing_delivered"]
