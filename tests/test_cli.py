"""The `imcluster` command as operators run it: a subprocess, its output and exit status."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from imcluster.auth import JWTAuthenticator
from imcluster.db import load_migrations
from tests.support.ids import POSTGRES_DSN

# starts processes: not part of the fast suite (-m "not slow")
pytestmark = pytest.mark.slow

SCRIPT = Path(sys.executable).parent / "imcluster"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "imcluster.cli"]
SECRET = "cli-test-secret-that-is-32-bytes!!"


def imcluster(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run `imcluster ARGS` with no IMCLUSTER_* variables but those in ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
    clean.update(env or {})
    return subprocess.run(COMMAND + list(args), capture_output=True, text=True, env=clean, cwd=cwd, timeout=60)


def assert_clean_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 1, nothing on stdout, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imcluster: error:"), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_token_prints_a_jwt_the_gateway_accepts():
    """`imcluster token` prints one JWT that a gateway configured with the same secret accepts."""
    result = imcluster("token", "--secret", SECRET, "--user", "alice", "--ttl", "3600",
                       "--audience", "im", "--issuer", "dev")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and token.count(".") == 2
    auth = JWTAuthenticator(secret=SECRET, audience="im", issuer="dev")
    identity = auth.authenticate(token)
    assert identity.user_id == "alice" and identity.claims["iss"] == "dev"


def test_token_with_a_private_key(tmp_path):
    """`imcluster token --private-key` signs ES256 with an EC key, verifiable with its public key."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    result = imcluster("token", "--private-key", str(path), "--user", "bob", "--ttl", "60")
    assert result.returncode == 0, result.stderr
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert JWTAuthenticator(public_key=public).authenticate(result.stdout.strip()).user_id == "bob"


@pytest.mark.parametrize("args, words", [
    (["--secret", "", "--user", "alice", "--ttl", "60"], ["secret"]),
    (["--secret", SECRET, "--user", "al ice", "--ttl", "60"], ["user id", "al ice"]),
    (["--secret", SECRET, "--user", "x" * 129, "--ttl", "60"], ["user id"]),
    (["--secret", SECRET, "--user", "alice", "--ttl", "0"], ["ttl"]),
    (["--secret", SECRET, "--user", "alice", "--ttl", "-5"], ["ttl"]),
])
def test_token_refuses_bad_input_clearly(args, words):
    """A bad secret, user id or ttl gives one clear line and exit 1, never a token or a traceback."""
    assert_clean_error(imcluster("token", *args), *words)


def test_token_usage_errors():
    """A missing required option is a usage error (exit 2) naming it."""
    result = imcluster("token", "--user", "alice", "--ttl", "60")
    assert result.returncode == 2 and "--secret" in result.stderr and "Traceback" not in result.stderr
    result = imcluster("token", "--secret", SECRET, "--user", "alice", "--ttl", "soon")
    assert result.returncode == 2 and "--ttl" in result.stderr


def test_migrate_applies_then_has_nothing_to_apply(pg_fresh_schema, pg_admin):
    """`imcluster migrate` applies each migration once, says so, and is a no-op the second time."""
    first = imcluster("migrate", "--postgres", POSTGRES_DSN, "--postgres-schema", pg_fresh_schema)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [f"applied {m} to schema {pg_fresh_schema}" for m in load_migrations()]
    second = imcluster("migrate", "--postgres", POSTGRES_DSN, "--postgres-schema", pg_fresh_schema)
    assert second.returncode == 0, second.stderr
    assert "nothing to apply" in second.stdout
    pg_admin.execute(f'SELECT count(*) FROM "{pg_fresh_schema}".schema_migrations')
    assert pg_admin.fetchone()[0] == len(load_migrations())


def test_migrate_reads_environment_and_file_with_precedence(pg_fresh_schema, pg_admin, tmp_path):
    """Settings come from the command line, then IMCLUSTER_*, then --config, like the daemons."""
    config = tmp_path / "imcluster.toml"
    # one cluster-wide file: other daemons' keys are fine, the file's DSN is wrong on purpose
    config.write_text(f'postgres = "postgresql://root@127.0.0.1:1/test"\n'
                      f'postgres_schema = "{pg_fresh_schema}"\nnamespace = "im"\njwt_secret = "x"\n')
    env = {"IMCLUSTER_POSTGRES": POSTGRES_DSN}
    result = imcluster("migrate", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    assert f"to schema {pg_fresh_schema}" in result.stdout
    # the command line beats the environment
    result = imcluster("migrate", "--config", str(config), "--postgres", "postgresql://root@127.0.0.1:1/test",
                       env=env)
    assert_clean_error(result, "127.0.0.1:1")


def test_migrate_warns_about_foreign_environment_variables(pg_fresh_schema, pg_admin):
    """A deploy tool's own IMCLUSTER_SRC stopped the command ('unknown option'); it is only a warning."""
    result = imcluster("migrate", "--postgres", POSTGRES_DSN, "--postgres-schema", pg_fresh_schema,
                       env={"IMCLUSTER_SRC": "/srv/deploy"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "imcluster: warning: ignoring environment variable IMCLUSTER_SRC: 'src' is no imcluster option"]
    # the command line still refuses what it does not know
    result = imcluster("migrate", "--postgres", POSTGRES_DSN, "--postgres-shema", pg_fresh_schema)
    assert result.returncode != 0 and "--postgres-shema" in result.stderr


@pytest.mark.parametrize("dsn, words", [
    ("postgresql://root@127.0.0.1:1/test", ["cannot reach PostgreSQL", "127.0.0.1:1"]),
    ("host=127.0.0.1 port=5432 dbname=test user", ["invalid PostgreSQL DSN"]),
    ("mysql://root@127.0.0.1/test", ["postgres", "postgresql://"]),
    ("postgresql://root@127.0.0.1:5432/imcluster_no_such_database", ["imcluster_no_such_database"]),
])
def test_migrate_bad_dsn_or_unreachable_server(dsn, words):
    """A wrong DSN or a server that does not answer gives one clear line and exit 1."""
    assert_clean_error(imcluster("migrate", "--postgres", dsn, "--postgres-schema", "imt_never_created"), *words)


def test_migrate_bad_schema_name():
    """A schema name that is not a plain identifier is refused before connecting."""
    assert_clean_error(imcluster("migrate", "--postgres", POSTGRES_DSN, "--postgres-schema", 'x"y'),
                       "postgres_schema")


def test_console_script_is_installed():
    """The `imcluster` console script exists next to the interpreter (setup.cfg entry point)."""
    assert SCRIPT.exists() or shutil.which("imcluster")
