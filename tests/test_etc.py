"""etc/imcluster.toml: the annotated example holds every option with its default."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from imcluster.config import API, GATEWAY, MIGRATE, OPTIONS, PROCESSOR, PUSH, PerDaemon, load_config, make_options

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "imcluster.toml"
REGENERATE = "regenerate it: .venv/bin/python scripts/gen-example-config > etc/imcluster.toml"


def _commented(option) -> bool:
    """Options without a default, or with one per daemon, appear commented out, with an example value."""
    return option.default is None or (option.secret and not option.default) or isinstance(option.default, PerDaemon)


def test_every_option_with_its_default():
    """An operator reading the example must see every setting and its real default."""
    data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    text = EXAMPLE.read_text(encoding="utf-8")
    for option in OPTIONS:
        if _commented(option):
            assert option.name not in data, f"{option.name} has no default: comment it out"
            assert re.search(rf"^# {option.name} = ", text, re.M), f"{option.name} missing; {REGENERATE}"
            if isinstance(option.default, PerDaemon):
                assert f"# default: {option.default.describe()};" in text, f"{option.name}: {REGENERATE}"
        else:
            assert option.name in data, f"{option.name} missing from {EXAMPLE}; {REGENERATE}"
            assert data[option.name] == option.default, f"{option.name}: default changed; {REGENERATE}"
            assert type(data[option.name]) is type(option.default), option.name
    assert set(data) <= {o.name for o in OPTIONS}


@pytest.mark.parametrize("daemon", [GATEWAY, PROCESSOR, API, PUSH, MIGRATE])
def test_every_daemon_accepts_it(daemon):
    """The example must start every daemon as it is (plus a JWT secret where one is required)."""
    env = {"IMCLUSTER_JWT_SECRET": "dev"} if daemon in (GATEWAY, API) else {}
    config = load_config(daemon, {}, str(EXAMPLE), env)
    for name, source in config.sources.items():
        if name != "jwt_secret":
            assert source in (f"file {EXAMPLE}", "default"), (name, source)


@pytest.mark.parametrize("daemon, plugin", [(GATEWAY, "imgateway"), (PROCESSOR, "improcessor"), (API, "imapi"),
                                            (PUSH, "impush")])
def test_twistd_options_accept_it(daemon, plugin, monkeypatch):
    """`twistd <daemon> --config etc/imcluster.toml` must parse, as README and systemd use it."""
    for name in [n for n in os.environ if n.startswith("IMCLUSTER_")]:
        monkeypatch.delenv(name)
    args = ["--config", str(EXAMPLE)]
    if daemon in (GATEWAY, API):
        args += ["--jwt-secret", "dev"]
    if daemon == PUSH:
        args += ["--push-url", "http://relay.example/push"]
    options = make_options(daemon, f"twistd {plugin}")()
    options.parseOptions(args)
    assert options.config.namespace == "im"
