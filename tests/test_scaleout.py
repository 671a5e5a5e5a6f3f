"""Issue 18, proven on several hosts: bench/scaleout.py --tiny kills a RabbitMQ node and a processor host under load.

The hosts are network namespaces on a private bridge made by the run itself
(tests/support/netns.py, tests/support/scaleout.py): a 3-node RabbitMQ
cluster with quorum queues, a PostgreSQL primary and streaming replica,
Redis, two gateway hosts and two processor hosts. What a user would check:
every acknowledged message reached every member (lost 0, duplicates only as
copies of the same msgId), seq gap-free per session, deliveries resumed after
each fault (the seconds are printed), and nothing of the run is left on the
machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.netns import available

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_scaleout_tiny_loses_nothing_when_nodes_die_under_load(tmp_path):
    """A cluster that lost or misnumbered messages when a node died would be no cluster at all."""
    why = available()
    if why:
        pytest.skip(why)
    out = tmp_path / "scaleout.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "scaleout.py"), "--tiny", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    stdout, stderr = proc.communicate(timeout=580)
    text = stdout[-4000:] + stderr[-6000:]
    assert proc.returncode == 0, text
    data = json.loads(out.read_text())
    # the processor queue is a quorum queue with a member on each of the 3 nodes
    assert data["queues"]["im.processor"]["type"] == "quorum", data["queues"]
    assert len(data["queues"]["im.processor"]["members"]) == 3, data["queues"]
    faults = {f["name"]: f for f in data["faults"]}
    expected = ["rabbit-node-kill", "processor-host-kill"]
    if data["redis_mode"] == "sentinel":  # the daemons take a Sentinel URL: the Redis primary dies too
        expected.insert(1, "redis-primary-kill")
    assert list(faults) == expected, text
    for f in faults.values():
        # deliveries resumed, and the time is printed
        assert f["resume_s"] is not None and f["resume_s"] < 30, text
        assert f"{f['name']} " in stdout and f"{f['resume_s']:.2f}" in stdout, stdout
    r = data["report"]
    assert r["messages"] > 20 and r["pairs"] > 0, text
    assert r["lost"] == 0, text
    assert r["mismatched"] == 0, text  # duplicates only as copies of the same msgId
    assert r["seq_gaps"] == 0 and r["server_seq_gaps"] == 0, text
    assert r["unanswered"] == 0, text
    assert r["after_heal"] > 0, text  # messages taken after the last fault too
    db = data["db"]
    assert db["db_seq_gaps"] == 0 and db["seq_from_1"] and db["stored"] >= r["messages"], db
    assert db["replica_rows"] == db["stored"], db  # the streaming replica kept up
    # nothing left behind: namespaces named after the run's pid, bridge, veths
    assert "LEFT BEHIND" not in stderr, stderr
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"imso-{proc.pid}-" not in netns, netns
