"""The benchmark script runs end to end at a tiny size and produces its table and JSON (not a benchmark)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.node import ensure_npm_packages

# starts processes: not part of the fast suite (-m "not slow")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: bench/gen.js needs Node 18+")
def test_bench_tiny_run_prints_table_and_writes_json(tmp_path):
    """A broken bench/run.py or gen.js would leave the performance docs without a way to re-measure them."""
    ensure_npm_packages(BENCH, "ws")
    # the reference peer's packages came later: an older node_modules may have ws alone
    ensure_npm_packages(BENCH, "@socket.io/redis-adapter")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--tiny", "--peer", "socketio", "--json", str(out)],
                          capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = ("echo", "conn", "conn-sse", "p2p-latency", "p2p-latency-sse", "p2p-throughput", "p2p-throughput-sse",
             "fanout", "sync")
    for name in names:
        assert f"\n{name} " in proc.stdout, proc.stdout
    data = json.loads(out.read_text())
    results = data["results"]
    assert set(results) == set(names)
    for name in ("conn", "conn-sse"):
        assert results[name]["connected"] == results[name]["params"]["n"]
    for name in ("p2p-latency", "p2p-latency-sse", "p2p-throughput", "p2p-throughput-sse", "fanout", "sync"):
        assert results[name]["lost"] == 0 and results[name]["duplicated"] == 0, (name, results[name])
    # the HTTP streaming transport beside WebSocket, on the same run
    assert results["p2p-throughput-sse"]["cost_vs_ws"] > 0
    assert "vs WebSocket's" in proc.stdout
    assert results["sync"]["received"] == results["sync"]["params"]["backlog"]
    assert 0 < results["p2p-latency"]["gen_cpu"] < 4
    # the reference peer ran the scenarios it has, with the same generator, nothing lost
    peer = data["peer"]
    assert set(peer["results"]) == {"conn", "p2p-latency", "p2p-throughput", "fanout"}
    assert peer["results"]["conn"]["connected"] == peer["results"]["conn"]["params"]["n"]
    for name in ("p2p-latency", "p2p-throughput", "fanout"):
        assert peer["results"][name]["lost"] == 0 and peer["results"][name]["duplicated"] == 0, (name, peer)
    assert {row["scenario"] for row in peer["ratios"]} == {"conn", "p2p-latency", "p2p-throughput", "fanout"}
    assert "imcluster beside Node socket.io" in proc.stdout


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: bench/gen.js needs Node 18+")
def test_many_conns_tiny_run_holds_them_and_measures_beside_them(tmp_path):
    """A broken bench/many_conns.py would leave issue 14's 100,000-connection figures without a way to re-measure."""
    ensure_npm_packages(BENCH, "ws")
    out = tmp_path / "many.json"
    proc = subprocess.run([sys.executable, str(BENCH / "many_conns.py"), "--tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "error" not in data, data.get("error")
    n = data["base_open"]["asked"] + data["rest_open"]["asked"]
    # every connection authenticated and held, spread over both gateways, from more than one source address
    assert data["held"]["total"] == n and sum(data["held"]["per_gateway"]) == n
    assert all(c > 0 for c in data["held"]["per_gateway"])
    assert len(data["meta"]["sources"]) > 1 and data["rest_open"]["generators"] > 1
    assert all(0 < kb < 100 for kb in data["gateway_rss_kb"]["per_conn"])
    assert 50 < data["redis"]["bytes_per_conn"] < 5000
    assert data["idle_cpu"]["gateways"] >= 0
    for key in ("p2p_base", "p2p_many"):
        p = data[key]
        assert p["sent"] > 0 and p["lost"] == 0 and p["duplicated"] == 0, (key, p)
        assert p["latency_ms"]["p99"] is not None
    assert "p99 with many" in proc.stdout
