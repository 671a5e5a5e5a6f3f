"""imcluster.config: one loader, precedence cli > environment > file > default."""

from __future__ import annotations

import pytest
from twisted.python import usage

from imcluster.config import (
    API, GATEWAY, OPTIONS, PROCESSOR, ConfigError, load_config, make_options, options_for, postgres_dsn,
)

JWT = {"IMCLUSTER_JWT_SECRET": "s3cret"}


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch):
    """The developer's own IMCLUSTER_* variables must not change these tests."""
    import os
    for name in list(os.environ):
        if name.startswith("IMCLUSTER_"):
            monkeypatch.delenv(name)


def _file(tmp_path, text, name="imcluster.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name, file_value, env_value, cli_value, expected", [
    ("namespace", '"fromfile"', "fromenv", "fromcli", ("fromfile", "fromenv", "fromcli", "im")),
    ("heartbeat", "7", "8.5", "9", (7.0, 8.5, 9.0, 60.0)),
    ("redis_prefix", '"f:"', "e:", "c:", ("f:", "e:", "c:", "")),
    ("max_frame_size", "1000", "2000", "3000", (1000, 2000, 3000, 65536)),
    ("ws", '["tcp:1", "tcp:2"]', "tcp:3,tcp:4", ["tcp:5"],
     (["tcp:1", "tcp:2"], ["tcp:3", "tcp:4"], ["tcp:5"], ["tcp:8080"])),
    ("compression", "false", "no", "true", (False, False, True, True)),
])
def test_precedence_load_config(tmp_path, name, file_value, env_value, cli_value, expected):
    """An operator's --option must win over the environment, which wins over the file."""
    from_file, from_env, from_cli, default = expected
    path = _file(tmp_path, f"{name} = {file_value}\nserver_ttl = 100\n")
    env = {"IMCLUSTER_" + name.upper(): env_value, **JWT}
    assert getattr(load_config(GATEWAY, {}, None, JWT), name) == default
    assert load_config(GATEWAY, {}, None, JWT).sources[name] == "default"
    config = load_config(GATEWAY, {}, path, JWT)
    assert getattr(config, name) == from_file
    assert config.sources[name] == f"file {path}"
    assert getattr(load_config(GATEWAY, {}, path, env), name) == from_env
    config = load_config(GATEWAY, {name: cli_value}, path, env)
    assert getattr(config, name) == from_cli
    assert config.sources[name].startswith("command line")


def test_precedence_make_options(tmp_path, monkeypatch):
    """twistd's command line must resolve the same way as load_config."""
    path = _file(tmp_path, 'namespace = "f"\nredis_prefix = "pf:"\nheartbeat = 5\nws = ["tcp:1"]\n'
                           'jwt_secret = "x"\n')
    monkeypatch.setenv("IMCLUSTER_REDIS_PREFIX", "pe:")
    monkeypatch.setenv("IMCLUSTER_HEARTBEAT", "6")
    options = make_options(GATEWAY, "twistd imgateway")()
    options.parseOptions(["--config", path, "--heartbeat", "7", "--ws", "tcp:2", "--ws=tcp:3"])
    config = options.config
    assert config.namespace == "f"  # file
    assert config.redis_prefix == "pe:"  # environment over file
    assert config.heartbeat == 7.0  # command line over environment
    assert config.ws == ["tcp:2", "tcp:3"]  # repeated on the command line, replaces the file's list
    assert config.tcp == ["tcp:8081"]  # default
    assert config.path == path


def test_config_from_environment_variable(tmp_path, monkeypatch):
    """IMCLUSTER_CONFIG must name the file when --config is not given (systemd Environment=)."""
    path = _file(tmp_path, 'namespace = "viaenv"\n')
    monkeypatch.setenv("IMCLUSTER_CONFIG", path)
    options = make_options(PROCESSOR, "twistd improcessor")()
    options.parseOptions([])
    assert options.config.namespace == "viaenv"


def test_flag_option():
    """`improcessor --migrate` must turn migration on; without it, off."""
    options = make_options(PROCESSOR, "twistd improcessor")()
    options.parseOptions(["--migrate"])
    assert options.config.migrate is True
    options = make_options(PROCESSOR, "twistd improcessor")()
    options.parseOptions([])
    assert options.config.migrate is False


@pytest.mark.parametrize("text, expected", [
    ('namespaces = "x"\n', r"unknown option 'namespaces' \(file .*imcluster.toml\)"),
    ("[gateway]\nws = 1\n", r"unknown section \[gateway\]"),
    ("namespace = \n", r"not valid TOML"),
])
def test_file_rejects_unknown(tmp_path, text, expected):
    """A typo in the file must stop the daemon before it starts, naming the key and the file."""
    with pytest.raises(ConfigError, match=expected):
        load_config(PROCESSOR, {}, _file(tmp_path, text), {})


def test_missing_file_named(tmp_path):
    """A wrong --config path must say which file could not be read."""
    with pytest.raises(ConfigError, match=r"cannot read configuration file .*nope.toml"):
        load_config(PROCESSOR, {}, str(tmp_path / "nope.toml"), {})


def test_environment_warns_about_unknown():
    """A deploy tool's own IMCLUSTER_SRC would stop every daemon; a misspelt variable must still be reported."""
    warnings = []
    config = load_config(PROCESSOR, {}, None, {"IMCLUSTER_HARTBEAT": "5", "IMCLUSTER_SRC": "/srv/x"},
                         warn=warnings.append)
    assert config.heartbeat == 60.0
    assert warnings == [
        "ignoring environment variable IMCLUSTER_HARTBEAT: 'hartbeat' is no imcluster option",
        "ignoring environment variable IMCLUSTER_SRC: 'src' is no imcluster option",
    ]


def test_environment_unknown_is_a_logged_warning():
    """Without a warn callable (twistd), the warning goes to twisted.logger, where twistd's log shows it."""
    from twisted.logger import LogLevel, globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        load_config(PROCESSOR, {}, None, {"IMCLUSTER_SRC": "/srv/x"})
    finally:
        globalLogPublisher.removeObserver(seen.append)
    [event] = [e for e in seen if e.get("log_namespace") == "imcluster.config"]
    assert event["log_level"] == LogLevel.warn and "IMCLUSTER_SRC" in event["message"]


def test_twistd_options_ignore_unknown_environment(monkeypatch):
    """`twistd imapi` must start with a foreign IMCLUSTER_* variable set, but still refuse an unknown flag."""
    monkeypatch.setenv("IMCLUSTER_SRC", "/srv/x")
    options = make_options(API, "twistd imapi")()
    options.parseOptions(["--jwt-secret", "dev"])
    assert options.config.namespace == "im"
    with pytest.raises(usage.UsageError):
        make_options(API, "twistd imapi")().parseOptions(["--jwt-secret", "dev", "--hartbeat", "5"])


def test_max_connections_defaults_per_daemon():
    """imapi and the gateway have their own cap by default; a value given applies to both."""
    assert load_config(GATEWAY, {}, None, JWT).max_connections == 50000
    assert load_config(API, {}, None, JWT).max_connections == 10000
    env = dict(JWT, IMCLUSTER_MAX_CONNECTIONS="7")
    assert load_config(GATEWAY, {}, None, env).max_connections == 7
    assert load_config(API, {}, None, env).max_connections == 7


@pytest.mark.parametrize("daemon, key, value, message", [
    (PROCESSOR, "heartbeat", '"soon"', "expected a number"),
    (PROCESSOR, "batch_size", "0", "must be greater than 0"),
    (PROCESSOR, "namespace", '"a.b"', "must be 1-64 characters"),
    (PROCESSOR, "redis", '"http://x"', "scheme redis, rediss, redis+sentinel"),
    (PROCESSOR, "postgres_schema", '"Bad-Schema"', "lower-case SQL identifier"),
    (PROCESSOR, "migrate", '"maybe"', "expected true or false"),
    (PROCESSOR, "filters", "[1, 2]", "expected a list of strings"),
    (GATEWAY, "ws", "[]", "needs at least one endpoint"),
    (GATEWAY, "max_connections", "true", "expected an integer"),
])
def test_bad_value_names_key_and_source(tmp_path, daemon, key, value, message):
    """A bad value must be reported with its key and where it came from, not crash later."""
    path = _file(tmp_path, f"{key} = {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(daemon, {}, path, JWT)
    assert str(e.value).startswith(f"{key} (file {path}): ")
    assert message in str(e.value)


def test_bad_value_from_env_and_cli():
    """The source named must be the one that holds the bad value."""
    with pytest.raises(ConfigError, match=r"^heartbeat \(environment variable IMCLUSTER_HEARTBEAT\): "):
        load_config(PROCESSOR, {}, None, {"IMCLUSTER_HEARTBEAT": "-1"})
    options = make_options(PROCESSOR, "twistd improcessor")()
    with pytest.raises(usage.UsageError, match=r"^batch_size \(command line --batch-size\): expected an integer"):
        options.parseOptions(["--batch-size", "many"])


def test_secret_path(tmp_path):
    """Secrets must be loadable from files (systemd credentials, mounted secrets), stripped."""
    secret = tmp_path / "jwt"
    secret.write_text("  from-a-file\n")
    keys = tmp_path / "keys"
    keys.write_text("k1\n\nk2\n")
    path = _file(tmp_path, f'jwt_secret_path = "{secret}"\napi_key_path = "{keys}"\n')
    config = load_config(API, {}, path, {})
    assert config.jwt_secret == "from-a-file"
    assert config.api_key == ["k1", "k2"]
    # environment and command line take *_path too, with the same precedence
    config = load_config(GATEWAY, {}, None, {"IMCLUSTER_JWT_SECRET_PATH": str(secret)})
    assert config.jwt_secret == "from-a-file"
    options = make_options(GATEWAY, "twistd imgateway")()
    options.parseOptions(["--jwt-secret-path", str(secret)])
    assert options.config.jwt_secret == "from-a-file"


def test_secret_path_unreadable(tmp_path):
    """A missing secret file must name the key and the path."""
    with pytest.raises(ConfigError, match=r"jwt_secret_path \(environment variable IMCLUSTER_JWT_SECRET_PATH\): "
                                          r"cannot read .*missing"):
        load_config(GATEWAY, {}, None, {"IMCLUSTER_JWT_SECRET_PATH": str(tmp_path / "missing")})


def test_other_daemons_secret_file_not_read(tmp_path):
    """A processor must start from a shared file whose gateway secret file only the gateway can read."""
    path = _file(tmp_path, f'jwt_secret_path = "{tmp_path / "gateway-only"}"\n')
    assert load_config(PROCESSOR, {}, path, {}).namespace == "im"


def test_jwt_required_for_gateway_and_api():
    """A gateway without a way to verify tokens would accept nobody; say so at start."""
    for daemon in (GATEWAY, API):
        with pytest.raises(ConfigError, match="jwt_secret or jwt_public_key is required"):
            load_config(daemon, {}, None, {})
    assert load_config(PROCESSOR, {}, None, {}).daemon == PROCESSOR


def test_jwt_secret_and_public_key_exclusive(tmp_path):
    """Two verification keys would make it unclear which tokens are accepted."""
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="not both"):
        load_config(GATEWAY, {"jwt_secret": "x", "jwt_public_key": str(pem)}, None, {})
    with pytest.raises(ConfigError, match=r"jwt_public_key \(command line --jwt-public-key\): no such file"):
        load_config(GATEWAY, {"jwt_public_key": str(tmp_path / "nope.pem")}, None, {})
    assert load_config(GATEWAY, {"jwt_public_key": str(pem)}, None, {}).jwt_public_key == str(pem)


@pytest.mark.parametrize("heartbeat, ttl", [(60, 60), (60, 30)])
def test_server_ttl_above_heartbeat(heartbeat, ttl):
    """A TTL not above the heartbeat would let live gateways expire and be reaped."""
    with pytest.raises(ConfigError, match="server_ttl .* must be greater than heartbeat"):
        load_config(PROCESSOR, {"heartbeat": str(heartbeat), "server_ttl": str(ttl)}, None, {})
    assert load_config(PROCESSOR, {"heartbeat": "1", "server_ttl": "3"}, None, {}).server_ttl == 3.0


def test_shared_file_for_the_whole_cluster(tmp_path):
    """One file holds every daemon's settings: each takes its own and ignores the others'."""
    path = _file(tmp_path, "\n".join([
        'namespace = "prod"',
        'jwt_secret = "x"',
        'ws = ["tcp:9000"]',
        'postgres = "postgresql://im@db/im"',
        'http = ["tcp:9090"]',
        'batch_size = 100',
        'api_key = ["admin"]',
    ]) + "\n")
    gateway = load_config(GATEWAY, {}, path, {})
    processor = load_config(PROCESSOR, {}, path, {})
    api = load_config(API, {}, path, {})
    assert (gateway.namespace, processor.namespace, api.namespace) == ("prod", "prod", "prod")
    assert gateway.ws == ["tcp:9000"] and not hasattr(gateway, "postgres")
    assert processor.batch_size == 100 and not hasattr(processor, "ws") and not hasattr(processor, "jwt_secret")
    assert api.http == ["tcp:9090"] and api.api_key == ["admin"]


def test_shared_file_bad_value_of_other_daemon(tmp_path):
    """A typo in the gateway's part of a shared file must show at the first start of any daemon."""
    path = _file(tmp_path, "max_connections = -5\n")
    with pytest.raises(ConfigError, match=r"^max_connections \(file "):
        load_config(PROCESSOR, {}, path, {})


def test_each_daemon_takes_only_its_options():
    """`improcessor --ws` must be a usage error, not silently ignored."""
    options = make_options(PROCESSOR, "twistd improcessor")()
    with pytest.raises(usage.UsageError):
        options.parseOptions(["--ws", "tcp:1"])


def test_postgres_password_applied():
    """postgres_password must reach the DSN (URL and key=value forms) without showing in the file."""
    config = load_config(PROCESSOR, {"postgres": "postgresql://im@db:5433/im", "postgres_password": "p@ss"}, None, {})
    assert postgres_dsn(config) == "postgresql://im:p%40ss@db:5433/im"
    config = load_config(PROCESSOR, {"postgres": "host=db user=im", "postgres_password": "it's"}, None, {})
    assert postgres_dsn(config) == "host=db user=im password='it\\'s'"


def test_every_option_documented_and_defaults_valid():
    """An option without help, or whose default its own parser rejects, breaks --help or start-up."""
    for option in OPTIONS:
        assert option.help and option.daemons
        for daemon in option.daemons:
            default = option.default_for(daemon)
            if default is not None:
                assert option.parse(default) == default, (option.name, daemon)
    for daemon in (GATEWAY, PROCESSOR, API):
        names = [o.name for o in options_for(daemon)]
        assert len(names) == len(set(names))


def test_bad_jwt_key_is_a_usage_error(tmp_path):
    """A bad JWT public key must stop `twistd imgateway`/`imapi` with a message, not a traceback."""
    from imcluster.api.tap import Options as ApiOptions
    from imcluster.gateway.tap import Options as GatewayOptions

    bad = tmp_path / "key.pem"
    bad.write_text("not a key")
    for options in (GatewayOptions, ApiOptions):
        with pytest.raises(usage.UsageError, match="jwt_public_key"):
            options().parseOptions(["--jwt-public-key", str(bad)])
