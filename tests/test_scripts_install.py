"""scripts/ensure-services on a machine that lacks a service (issue 17).

A fresh Debian or Ubuntu machine has none of Redis, RabbitMQ and PostgreSQL.
These tests give the script such a machine: a network namespace of their own
(nothing answers on its loopback, the shared services stay untouched) and a
PATH without ``redis-server``. As root the script installs the package with
apt-get (a stand-in apt-get here, which "installs" the machine's real
redis-server binary), starts it and waits until it answers; otherwise it
prints the one command that would install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ensure-services"

# what the script itself runs, besides bash builtins
TOOLS = ("bash", "env", "dirname", "ls", "sort", "tail", "sleep", "cat", "grep", "mkdir", "id", "printf")


def _can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


needs_netns = pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and iproute2 for a network namespace")


@pytest.fixture
def netns():
    name = f"imtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        # end what the test started in there (by PID), then the namespace
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "delete", name], check=False)


def _bin_without_redis(tmp_path: Path) -> Path:
    """A PATH directory with the tools the script needs and no Redis."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return bin_dir


def _run(netns: str, bin_dir: Path, *, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(bin_dir), "IMCLUSTER_SERVICES_TIMEOUT": "20", **(extra_env or {})}
    return subprocess.run(
        ["ip", "netns", "exec", netns, str(bin_dir / "env"), "-i", *[f"{k}={v}" for k, v in env.items()],
         str(bin_dir / "bash"), str(SCRIPT), "redis"],
        capture_output=True, text=True, timeout=60,
    )


@needs_netns
def test_missing_service_without_root_prints_the_install_command(netns, tmp_path):
    bin_dir = _bin_without_redis(tmp_path)
    (bin_dir / "id").unlink()
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")  # not root
    (bin_dir / "id").chmod(0o755)
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/apt-get.calls\"\n")
    (bin_dir / "apt-get").chmod(0o755)

    result = _run(netns, bin_dir)

    assert result.returncode != 0
    assert "sudo apt-get install -y redis-server" in result.stderr
    assert not (bin_dir / "apt-get.calls").exists(), "installed although not root"


@needs_netns
def test_missing_service_as_root_is_installed_started_and_answers(netns, tmp_path):
    bin_dir = _bin_without_redis(tmp_path)
    calls = bin_dir / "apt-get.calls"
    real_redis = shutil.which("redis-server")
    assert real_redis
    # apt-get's stand-in: records its arguments; "installing" redis-server
    # puts the machine's real binary on the PATH
    (bin_dir / "apt-get").write_text(
        "#!/bin/bash\n"
        f"echo \"$*\" >> {calls}\n"
        "case \" $* \" in *' install '*redis-server*) "
        f"{shutil.which('ln')} -sf {real_redis} {bin_dir}/redis-server ;; esac\n"
    )
    (bin_dir / "apt-get").chmod(0o755)

    result = _run(netns, bin_dir)

    assert result.returncode == 0, result.stderr
    assert "installing with apt-get" in result.stderr
    recorded = calls.read_text().splitlines()
    assert recorded[0] == "update -q"
    assert recorded[1] == "install -y -q redis-server"
    # it answers inside the namespace, where nothing else could have
    ping = subprocess.run(
        ["ip", "netns", "exec", netns, shutil.which("redis-cli") or "redis-cli", "-p", "6379", "ping"],
        capture_output=True, text=True, timeout=10,
    )
    assert ping.stdout.strip() == "PONG"


@needs_netns
def test_no_install_setting_only_says_what_is_missing(netns, tmp_path):
    bin_dir = _bin_without_redis(tmp_path)
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/apt-get.calls\"\n")
    (bin_dir / "apt-get").chmod(0o755)

    result = _run(netns, bin_dir, extra_env={"IMCLUSTER_NO_INSTALL": "1"})

    assert result.returncode != 0
    assert "apt-get install -y redis-server" in result.stderr
    assert not (bin_dir / "apt-get.calls").exists()
