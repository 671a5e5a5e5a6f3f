"""systemd/: one unit template per daemon, started the way ARCHITECTURE.md fixes."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python import usage

from imcluster.config import API, GATEWAY, PROCESSOR, PUSH, make_options

# starts processes: not part of the fast suite (-m "not slow")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
TWISTD = Path(sys.executable).parent / "twistd"
DAEMONS = {"imgateway": GATEWAY, "improcessor": PROCESSOR, "imapi": API, "impush": PUSH}
TAPS = {"imgateway": "imcluster.gateway.tap", "improcessor": "imcluster.processor.tap", "imapi": "imcluster.api.tap",
        "impush": "imcluster.push.tap"}

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}`` (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), {})
            continue
        assert current is not None and "=" in line, f"{path.name}: cannot parse {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit, section, key) -> str:
    values = unit[section].get(key)
    assert values and len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def exec_start(unit, instance="main") -> list[str]:
    return shlex.split(one(unit, "Service", "ExecStart").replace("%i", instance))


@pytest.fixture(params=sorted(DAEMONS))
def plugin(request) -> str:
    return request.param


@pytest.fixture
def unit(plugin):
    path = UNITS / f"{plugin}@.service"
    assert path.is_file(), f"missing {path}"
    return parse_unit(path)


def test_exec_start_contract(unit, plugin):
    """systemd must start the daemon in the foreground, without a pid file, logging JSON, per config file."""
    argv = exec_start(unit)
    assert Path(argv[0]).name == "twistd" and Path(argv[0]).is_absolute()
    index = argv.index(plugin)
    twistd_args, plugin_args = argv[1:index], argv[index + 1:]
    assert "-n" in twistd_args or "--nodaemon" in twistd_args
    assert "--pidfile=" in twistd_args
    assert "--logger=imcluster.logs.json_observer" in twistd_args
    assert plugin_args == ["--config", "/etc/imcluster/main.toml"]
    # the logger named there must exist and be a log observer factory
    module, _, name = "imcluster.logs.json_observer".rpartition(".")
    assert callable(getattr(importlib.import_module(module), name)())


def test_exec_start_parses_with_daemon_options(unit, plugin, tmp_path, monkeypatch):
    """An ExecStart that the daemon's own option parser rejects would fail on every boot."""
    for name in [n for n in os.environ if n.startswith("IMCLUSTER_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "main.toml"
    config.write_text((ROOT / "etc" / "imcluster.toml").read_text() + '\njwt_secret = "x"\npush_url = "http://relay"\n')
    argv = [a.replace("/etc/imcluster/main.toml", str(config)) for a in exec_start(unit)]
    plugin_args = argv[argv.index(plugin) + 1:]
    options = make_options(DAEMONS[plugin], f"twistd {plugin}")()
    options.parseOptions(plugin_args)
    assert options.config.path == str(config)

    # and twistd's own parser, through plugin discovery, once the daemon exists
    try:
        importlib.import_module(TAPS[plugin])
    except ImportError as e:
        pytest.skip(f"{TAPS[plugin]} not importable yet: {e}")
    from twisted.scripts.twistd import ServerOptions

    server_options = ServerOptions()
    server_options.parseOptions(argv[1:])
    assert server_options.subCommand == plugin
    assert server_options["nodaemon"] and server_options["pidfile"] == ""
    assert server_options.subOptions.config.path == str(config)


def test_service_policy(unit, plugin):
    """The unit must restart on failure, stop with SIGTERM, and give shutdown_timeout time to finish."""
    from imcluster.config import OPTIONS_BY_NAME

    service = unit["Service"]
    assert one(unit, "Service", "Type") == "simple"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    stop = re.fullmatch(r"(\d+)s?", one(unit, "Service", "TimeoutStopSec"))
    assert stop and int(stop.group(1)) > OPTIONS_BY_NAME["shutdown_timeout"].default
    assert one(unit, "Service", "User") == "imcluster" or one(unit, "Service", "DynamicUser") == "yes"
    assert "root" not in service.get("User", [])
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "%i" in one(unit, "Unit", "Description")


def test_hardening(unit):
    """A compromised daemon must not get privileges, write the system, or see home folders."""
    for key, value in HARDENING.items():
        assert one(unit, "Service", key) == value, key
    assert "@system-service" in unit["Service"]["SystemCallFilter"]


def test_sysusers_declares_the_user():
    """User=imcluster needs the user to exist: the sysusers.d file creates it."""
    text = (UNITS / "imcluster.sysusers").read_text()
    assert re.search(r"^u\s+imcluster\s", text, re.M)


def test_systemd_analyze_verify(tmp_path, plugin):
    """systemd must accept the unit as written: no unknown keys, bad values or missing commands."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    text = (UNITS / f"{plugin}@.service").read_text()
    # the unit's twistd lives in /opt/imcluster/venv; verify with this venv's, which exists
    (tmp_path / f"{plugin}@.service").write_text(text.replace("/opt/imcluster/venv/bin/twistd", str(TWISTD)))
    result = subprocess.run([tool, "verify", str(tmp_path / f"{plugin}@test.service")],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    # systemd warns (exit 0) about unknown keys and bad values: any line about our unit fails
    problems = [line for line in output.splitlines() if plugin in line]
    assert result.returncode == 0 and not problems, output
