"""The ``imcluster`` command: operator tools beside the twistd daemons.

``imcluster migrate``
    applies pending schema migrations (the same configuration loader as the
    daemons: command line, then ``IMCLUSTER_*`` environment, then
    ``--config`` file, then defaults).
``imcluster prune``
    deletes old messages and delivered delivery rows in small batches
    (:mod:`imcluster.store.prune`).
``imcluster token``
    prints a signed JWT for development and tests.

Errors are one line on standard error and a non-zero exit status, never a
traceback: 1 for any failure (bad value, bad DSN, unreachable server, failed
migration), 2 when the command line itself does not parse.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import psycopg2

from imcluster import __version__
from imcluster.config import MIGRATE, ConfigError, load_config, options_for, postgres_dsn

EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the whole usage
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_config_options(parser: argparse.ArgumentParser, daemon: str) -> None:
    """``--<option>`` (and ``--<secret>-path``) for every option of ``daemon``, from config.OPTIONS."""
    parser.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file")
    for o in options_for(daemon):
        default = o.default_for(daemon)
        help_text = o.help + (f" [default: {default}]" if default not in (None, [], "") else "")
        if o.flag:
            parser.add_argument("--" + o.cli, dest=o.name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument("--" + o.cli, dest=o.name, metavar=o.name.split("_")[-1].upper(),
                                action="append" if o.multi else "store", help=help_text)
        if o.secret:
            parser.add_argument("--" + o.cli + "-path", dest=o.name + "_path", metavar="FILE",
                                help=f"file holding {o.name}")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``imcluster`` and its subcommands."""
    parser = _Parser(prog="imcluster", description="imcluster operator tools")
    parser.add_argument("--version", action="version", version=f"imcluster {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    migrate = sub.add_parser(
        "migrate", help="apply pending PostgreSQL schema migrations",
        description="Apply pending migrations (imcluster/migrations/NNNN_name.sql) to the configured schema, "
                    "each in its own transaction; safe to run twice or concurrently.")
    _add_config_options(migrate, MIGRATE)
    migrate.set_defaults(run=run_migrate)

    token = sub.add_parser(
        "token", help="print a signed JWT (development and tests)",
        description="Print a JWT whose 'sub' is the user id, valid for --ttl seconds.")
    key = token.add_mutually_exclusive_group(required=True)
    key.add_argument("--secret", help="HMAC secret (HS256 unless --algorithm says otherwise)")
    key.add_argument("--private-key", metavar="FILE", help="PEM private key (RS256 or ES256 per the key)")
    token.add_argument("--user", required=True, help="the user id (token 'sub')")
    token.add_argument("--ttl", required=True, type=float, help="seconds the token is valid")
    token.add_argument("--audience", help="the 'aud' claim")
    token.add_argument("--issuer", help="the 'iss' claim")
    token.add_argument("--algorithm", help="signing algorithm (default HS256; RS256/ES256 with --private-key)")
    token.set_defaults(run=run_token)

    prune = sub.add_parser(
        "prune", help="delete old messages and delivered delivery rows, in small batches",
        description="Delete messagerecv rows older than --older-than days (their messagesend rows go with "
                    "them) and messagesend rows delivered more than --delivered-older-than days ago, in "
                    "primary-key ranges of --batch rows, each its own short transaction (no long locks). "
                    "Processors can do the same by themselves: retention_days.")
    _add_config_options(prune, MIGRATE)
    prune.add_argument("--older-than", type=float, metavar="DAYS", required=True,
                       help="delete messages created more than DAYS days ago")
    prune.add_argument("--delivered-older-than", type=float, metavar="DAYS",
                       help="also delete messagesend rows delivered more than DAYS days ago while "
                            "their message is kept (default: none; they go with their message)")
    prune.add_argument("--batch", type=int, default=1000, metavar="N",
                       help="messages (or delivery rows) one statement deletes at most [default: 1000]")
    prune.add_argument("--pause", type=float, default=0.0, metavar="SECONDS",
                       help="pause between two statements, to leave room to live traffic [default: 0]")
    prune.set_defaults(run=run_prune)

    from imcluster.client import chat as chat_module  # the terminal chat lives with the client
    chat = sub.add_parser(
        "chat", help="terminal chat over a gateway (WebSocket or TCP)",
        description="Join a session and chat: history, live messages, read receipts, presence (--api).")
    chat_module.add_arguments(chat)
    chat.set_defaults(run=chat_module.run)
    return parser


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"imcluster: error: {message}", file=sys.stderr)
    return code


def _warn(message: str) -> None:
    print(f"imcluster: warning: {message}", file=sys.stderr)


def run_migrate(args: argparse.Namespace) -> int:
    """``imcluster migrate``: apply pending migrations, print each one, exit 0."""
    from imcluster.db import MigrationError, apply_migrations_sync, describe_dsn

    cli = {o.name: getattr(args, o.name, None) for o in options_for(MIGRATE)}
    cli.update({o.name + "_path": getattr(args, o.name + "_path", None)
                for o in options_for(MIGRATE) if o.secret})
    try:
        config = load_config(MIGRATE, cli, args.config, warn=_warn)
    except ConfigError as e:
        return _fail(str(e), EXIT_FAILURE)
    dsn = postgres_dsn(config)
    where = describe_dsn(dsn)

    def applied(m) -> None:
        print(f"applied {m} to schema {config.postgres_schema}", flush=True)

    try:
        done = apply_migrations_sync(dsn, config.postgres_schema, config.postgres_timeout, on_applied=applied)
    except ValueError as e:
        return _fail(str(e), EXIT_FAILURE)
    except psycopg2.OperationalError as e:
        return _fail(f"cannot reach PostgreSQL at {where}: {_first_line(e)}")
    except MigrationError as e:
        return _fail(str(e))
    except psycopg2.Error as e:
        return _fail(f"PostgreSQL at {where}: {_first_line(e)}")
    if not done:
        print(f"nothing to apply: schema {config.postgres_schema} is up to date")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    """``imcluster prune``: retention by hand; prints what it deleted and how long it took."""
    from imcluster.db import check_schema, describe_dsn
    from imcluster.store.prune import prune_sync

    if args.older_than < 0 or (args.delivered_older_than is not None and args.delivered_older_than < 0):
        return _fail("--older-than and --delivered-older-than must be >= 0")
    if args.batch < 1:
        return _fail("--batch must be at least 1")
    cli = {o.name: getattr(args, o.name, None) for o in options_for(MIGRATE)}
    cli.update({o.name + "_path": getattr(args, o.name + "_path", None)
                for o in options_for(MIGRATE) if o.secret})
    try:
        config = load_config(MIGRATE, cli, args.config, warn=_warn)
        schema = check_schema(config.postgres_schema)
    except (ConfigError, ValueError) as e:
        return _fail(str(e), EXIT_FAILURE)
    dsn = postgres_dsn(config)
    try:
        conn = psycopg2.connect(dsn, connect_timeout=max(1, int(round(config.postgres_timeout))),
                                application_name="imcluster-prune")
    except psycopg2.Error as e:
        return _fail(f"cannot reach PostgreSQL at {describe_dsn(dsn)}: {_first_line(e)}")
    try:
        conn.autocommit = True  # every statement its own short transaction
        with conn.cursor() as c:
            c.execute(f'SET search_path TO "{schema}"')
        result = prune_sync(conn, args.older_than, args.delivered_older_than, args.batch, args.pause)
    except psycopg2.Error as e:
        return _fail(f"PostgreSQL at {describe_dsn(dsn)}: {_first_line(e)}")
    finally:
        conn.close()
    print(f"pruned {result.messages} messages and {result.deliveries} delivered rows from schema {schema} "
          f"in {result.seconds:.1f}s ({result.statements} statements)", flush=True)
    return 0


def run_token(args: argparse.Namespace) -> int:
    """``imcluster token``: print a JWT on standard output."""
    from imcluster.auth import mint_token

    if args.private_key is not None:
        try:
            with open(args.private_key, "rb") as f:
                key: str | bytes = f.read()
        except OSError as e:
            return _fail(f"cannot read --private-key {args.private_key}: {e.strerror}", EXIT_FAILURE)
        algorithm = args.algorithm or _algorithm_of(key)
        if algorithm is None:
            return _fail(f"--private-key {args.private_key} is not a PEM RSA or EC P-256 private key",
                         EXIT_FAILURE)
    else:
        key = args.secret
        algorithm = args.algorithm or "HS256"
    try:
        token = mint_token(key, args.user, args.ttl, algorithm=algorithm,
                           aud=args.audience, iss=args.issuer)
    except ValueError as e:
        return _fail(str(e), EXIT_FAILURE)
    print(token)
    return 0


def _algorithm_of(pem: bytes) -> str | None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        return None
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        return "ES256"
    return None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imcluster`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
