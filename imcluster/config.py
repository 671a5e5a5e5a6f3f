"""One configuration loader for every imcluster daemon and command.

Every option is declared once in :data:`OPTIONS`.  A value comes from, in
order of precedence: the command line, an ``IMCLUSTER_<NAME>`` environment
variable, the TOML file given with ``--config``, the default.  The TOML file is
flat (one key per option, the option's name with ``_`` for ``-``) so one file
can hold the settings of a whole cluster: each daemon reads the keys that apply
to it and ignores those of the others, but a key that no daemon knows, or a bad
value, is rejected before anything starts, with a message that names the key
and where it came from.

Secrets (``jwt_secret``, ``api_key``, ``*_password``) may also be given as
``<name>_path``: the file's content, stripped of surrounding white space.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

from twisted.python import usage

GATEWAY = "gateway"
PROCESSOR = "processor"
API = "api"
MIGRATE = "migrate"
#: twistd impush: offline push requests to the business's push relay (HTTP-API.md 1.1)
PUSH = "push"

ALL_DAEMONS = frozenset({GATEWAY, PROCESSOR, API, PUSH})

ENV_PREFIX = "IMCLUSTER_"


class ConfigError(ValueError):
    """A configuration value is unknown or bad; the message names key and source."""


# --- value parsers: each takes the raw value (str from CLI/env, any from TOML)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            pass
    raise ValueError(f"expected an integer, got {value!r}")


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise ValueError(f"expected a number, got {value!r}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {value!r}")


def _str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        # environment variables: comma separated
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"expected a list of strings, got {value!r}")


def _positive(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        v = kind(value)
        if v <= 0:
            raise ValueError(f"must be greater than 0, got {v!r}")
        return v

    return parse


def _at_least(least: int, kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        v = kind(value)
        if v < least:
            raise ValueError(f"must be at least {least}, got {v!r}")
        return v

    return parse


def _non_negative(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        v = kind(value)
        if v < 0:
            raise ValueError(f"must not be negative, got {v!r}")
        return v

    return parse


_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _namespace(value: Any) -> str:
    v = _str(value)
    if not _NAMESPACE_RE.match(v):
        raise ValueError(f"must be 1-64 characters of A-Z a-z 0-9 _ -, got {v!r}")
    return v


def _url(*schemes: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        v = _str(value)
        scheme = urlsplit(v).scheme
        if scheme not in schemes:
            raise ValueError(f"must be a URL with scheme {' or '.join(schemes)}, got {v!r}")
        return v

    return parse


_REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")


def _redis_urls(value: Any) -> str:
    """One or several shard URLs (comma separated, repeated, or a TOML list) -> one comma-joined string.

    A piece without ``://`` continues a ``redis+sentinel://`` URL's host list.
    The full parsing is :func:`imcluster.registry.parse_redis_urls`' (this floor cannot import it).
    """
    items = [value] if isinstance(value, str) else _str_list(value)
    pieces = [p.strip() for item in items for p in item.split(",") if p.strip()]
    if not pieces:
        raise ValueError("needs at least one redis:// URL")
    sentinel_hosts = False
    for p in pieces:
        if "://" in p:
            scheme = p.split("://", 1)[0]
            if scheme not in _REDIS_SCHEMES:
                raise ValueError(f"must be URLs with scheme {', '.join(_REDIS_SCHEMES)}, got {p!r}")
            sentinel_hosts = scheme.endswith("+sentinel") and "/" not in p.split("://", 1)[1]
        elif not sentinel_hosts:
            raise ValueError(f"{p!r} is not a redis URL (only redis+sentinel:// lists several hosts)")
        else:
            sentinel_hosts = "/" not in p
    return ",".join(pieces)


def _postgres_dsn(value: Any) -> str:
    v = _str(value)
    if "://" in v and urlsplit(v).scheme not in ("postgres", "postgresql"):
        raise ValueError(f"must be a postgresql:// URL or a libpq key=value string, got {v!r}")
    return v


def _amqp_urls(value: Any) -> list[str]:
    urls = [u.strip() for v in _str_list(value) for u in v.split(",") if u.strip()]
    if not urls:
        raise ValueError("needs at least one amqp:// or amqps:// URL")
    return [_url("amqp", "amqps")(u) for u in urls]


def _postgres_dsns(value: Any) -> list[str]:
    # a key=value DSN has no commas of its own; a URL's query would be percent-encoded
    return [_postgres_dsn(v) for v in _str_list(value)]


def _identifier(value: Any) -> str:
    v = _str(value)
    if not re.match(r"^[a-z_][a-z0-9_]{0,62}$", v):
        raise ValueError(f"must be a lower-case SQL identifier, got {v!r}")
    return v


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        v = _str(value)
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    return parse


def _endpoints(value: Any) -> list[str]:
    v = _str_list(value)
    if not v:
        raise ValueError("needs at least one endpoint string, e.g. tcp:8080")
    return v


def _ws_urls(value: Any) -> list[str]:
    v = _str_list(value)
    if not v:
        raise ValueError("needs at least one ws:// or wss:// URL")
    return [_url("ws", "wss")(u) for u in v]


def _http_urls(value: Any) -> list[str]:
    return [_url("http", "https")(u) for u in _str_list(value)]


#: the events a business server may receive at webhook_url (HTTP-API.md)
WEBHOOK_EVENTS = ("message.stored", "session.members", "user.online", "user.offline")


def _webhook_events(value: Any) -> list[str]:
    v = _str_list(value)
    unknown = [e for e in v if e not in WEBHOOK_EVENTS]
    if unknown:
        raise ValueError(f"unknown event(s) {', '.join(unknown)}; known: {', '.join(WEBHOOK_EVENTS)}")
    return v


class PerDaemon(dict):
    """A default that differs between daemons: ``PerDaemon(gateway=50000, api=10000)``.

    A value given in a file, the environment or on the command line still
    applies to every daemon that reads the key (a shared file sets it for
    all of them); only the defaults differ.
    """

    def describe(self) -> str:
        return ", ".join(f"{daemon} {value}" for daemon, value in sorted(self.items()))


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    daemons: frozenset[str]
    help: str
    secret: bool = False
    multi: bool = False  # may be repeated on the command line
    flag: bool = False  # a command-line flag without a value

    @property
    def cli(self) -> str:
        return self.name.replace("_", "-")

    def default_for(self, daemon: str) -> Any:
        """The default value of this option in ``daemon``."""
        default = self.default
        if isinstance(default, PerDaemon):
            default = default[daemon]
        return default() if callable(default) else default

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


G, P, A, M = {GATEWAY}, {PROCESSOR}, {API}, {MIGRATE}


def _opt(name, parse, default, daemons, help, **kw) -> Option:
    return Option(name, parse, default, frozenset(daemons), help, **kw)


OPTIONS: list[Option] = [
    # --- shared state
    _opt("namespace", _namespace, "im", G | P | A,
         "business namespace: AMQP names <ns>.exchange, <ns>.server, <ns>.processor, <ns>.wsserver.<uuid>"),
    _opt("redis", _redis_urls, "redis://127.0.0.1:6379/0", G | P | A,
         "Redis URL: redis[s]://[[user]:password@]host[:port][/db], or "
         "redis+sentinel://host:port,host:port/<master>[/db] (Sentinel: follows failovers); several "
         "(comma separated, repeated, or a list) shard the keys by hash tag, and every daemon must "
         "be given the same shards", multi=True),
    _opt("redis_password", _str, None, G | P | A, "Redis password (overrides the URL's)", secret=True),
    _opt("redis_prefix", _str, "", G | P | A, "prepended to every Redis key"),
    _opt("redis_timeout", _positive(_float), 5.0, G | P | A, "seconds before a Redis command fails"),
    _opt("redis_batch", _positive(_int), 1000, G | P | A,
         "connections one Redis script removes at once when a gateway unregisters or is reaped"),
    _opt("amqp", _amqp_urls, ["amqp://guest:guest@127.0.0.1:5672/%2F"], G | P | A,
         "RabbitMQ URL, or the URLs of a RabbitMQ cluster's nodes (repeat --amqp, or separate them "
         "with commas; a TOML list): a daemon connects to the first and moves on to the next when "
         "its node goes", multi=True),
    _opt("queue_type", _choice("classic", "quorum"), "classic", G | P | A,
         "how the shared queues (<ns>.processor, <ns>.webhooks, <ns>.push, <ns>.dead) are declared: "
         "quorum queues survive a RabbitMQ node's loss (needs a cluster of 3 or more); a queue's "
         "type never changes once it exists, and every daemon must give the same"),
    _opt("amqp_password", _str, None, G | P | A, "RabbitMQ password (overrides the URL's)", secret=True),
    _opt("publish_timeout", _positive(_float), 5.0, G | P | A,
         "seconds a publish waits for the broker (connection and confirm) before it fails"),
    _opt("publish_backlog", _positive(_int), 10000, G | P | A,
         "publishes held while RabbitMQ is unreachable; past it a publish fails at once"),
    _opt("max_publish_bytes", _at_least(262144, _int), 8388608, G | P | A,
         "largest AMQP message body a daemon publishes (bytes; below the broker's max_message_size): "
         "gateway batches, deliveries, sync pages and history replies are split or capped to fit"),
    _opt("postgres", _postgres_dsn, "postgresql://root@127.0.0.1:5432/root", P | A | M, "PostgreSQL DSN"),
    _opt("postgres_password", _str, None, P | A | M, "PostgreSQL password (overrides the DSN's)", secret=True),
    _opt("postgres_replica", _postgres_dsns, [], P | A,
         "DSN(s) of PostgreSQL streaming replicas (repeat the option; a TOML list) that serve "
         "history and the HTTP API's reads (sessions, a user's sessions, read cursors); sync, seq assignment, "
         "de-duplication and every write stay on --postgres, as do reads while no replica "
         "answers (empty: everything on --postgres)", multi=True),
    _opt("postgres_schema", _identifier, "public", P | A | M, "PostgreSQL schema holding imcluster's tables"),
    _opt("postgres_pool_size", _positive(_int), 4, P | A, "PostgreSQL connections per daemon"),
    _opt("postgres_timeout", _positive(_float), 10.0, P | A | M, "seconds to connect to PostgreSQL"),
    _opt("postgres_statement_timeout", _positive(_float), 30.0, P | A,
         "seconds one PostgreSQL statement may run before the server cancels it (then it is retried)"),
    # --- authentication
    _opt("jwt_secret", _str, None, G | A, "HS256 secret that signs client tokens", secret=True),
    _opt("jwt_public_key", _str, None, G | A, "PEM file of the RS256/ES256 public key that verifies client tokens"),
    _opt("jwt_algorithms", _str_list, None, G | A,
         "accepted JWT algorithms (default HS256 with --jwt-secret, RS256 and ES256 with --jwt-public-key)"),
    _opt("jwt_audience", _str, None, G | A, "required 'aud' claim"),
    _opt("jwt_issuer", _str, None, G | A, "required 'iss' claim"),
    _opt("jwt_leeway", _non_negative(_float), 10.0, G | A, "seconds of clock skew allowed on exp/nbf/iat"),
    # --- daemon processes
    _opt("heartbeat", _positive(_float), 60.0, G | P,
         "seconds between refreshes of WSSERVER_<uuid>; the reaper runs as often"),
    _opt("server_ttl", _positive(_float), 300.0, G | P, "TTL in seconds of WSSERVER_<uuid>"),
    _opt("shutdown_timeout", _positive(_float), 30.0, G | P | A, "seconds a daemon may take to stop on SIGTERM"),
    _opt("metrics", _str_list, [], G | P,
         "endpoint string(s) serving /metrics and /healthz (empty: off)", multi=True),
    _opt("max_connections", _positive(_int), PerDaemon(gateway=50000, api=10000), G | A,
         "client connections one daemon holds open (gateway: WebSocket and TCP sockets, handshakes "
         "included, and HTTP streaming connections; its --stream listeners also hold at most this "
         "many HTTP sockets; api: HTTP connections); past it a new one is closed at once "
         "(imcluster_http_connections_refused_total in the api and on --stream)"),
    # --- gateway
    _opt("ws", _endpoints, ["tcp:8080"], G, "WebSocket listening endpoint(s)", multi=True),
    _opt("tcp", _endpoints, ["tcp:8081"], G, "raw TCP listening endpoint(s)", multi=True),
    _opt("stream", _str_list, ["tcp:8082"], G,
         "HTTP streaming endpoint(s) (POST /stream, Server-Sent Events and long polling at "
         "/stream/<id>) for web clients whose WebSocket is blocked (empty: off)", multi=True),
    _opt("stream_resume", _positive(_float), 30.0, G,
         "seconds an HTTP streaming connection lives without an open event stream or poll; then it "
         "is closed as a closed socket is (imcluster_closes_total{reason=\"stream_resume\"})"),
    _opt("stream_resume_bytes", _positive(_int), 1048576, G,
         "bytes of frames already sent on an event stream kept for a resume with Last-Event-ID; a "
         "resume from before them closes the connection with error resume_lost (the client "
         "reconnects and gets the rest by sync; imcluster_closes_total{reason=\"resume_lost\"})"),
    _opt("stream_poll_timeout", _positive(_float), 25.0, G,
         "seconds a long poll (GET /stream/<id>?after=n) waits for a frame before it answers []"),
    _opt("stream_keepalive", _positive(_float), 15.0, G,
         "seconds between comment lines on an idle event stream (proxies drop silent responses)"),
    _opt("allowed_origins", _str_list, ["*"], G,
         "web origins (scheme://host[:port]) whose pages may use the --stream endpoints (CORS); "
         "* is any origin, as the WebSocket endpoint accepts any; a request from another origin "
         "is answered 403", multi=True),
    _opt("advertise", _str, None, G, "the ip written to WSSERVER_<uuid> (default: first non-loopback address)"),
    _opt("max_frame_size", _positive(_int), 65536, G | A,
         "largest client frame in bytes of JSON (imapi holds a posted message to the same size)"),
    _opt("max_bad_frames", _positive(_int), 10, G, "bad frames in a row that close a connection"),
    _opt("auth_timeout", _positive(_float), 10.0, G, "seconds a connection has to authenticate"),
    _opt("idle_timeout", _positive(_float), 90.0, G, "seconds without any frame before a connection is closed"),
    _opt("ws_ping_interval", _non_negative(_float), 30.0, G, "seconds between WebSocket pings (0: none)"),
    _opt("handshake_timeout", _positive(_float), 10.0, G, "seconds a WebSocket opening handshake may take"),
    _opt("max_handshake_size", _positive(_int), 16384, G,
         "bytes of a WebSocket opening handshake (request line and headers); a larger one is "
         "answered HTTP 431 and closed"),
    _opt("output_buffer_limit", _positive(_int), 1048576, G,
         "bytes of pending output after which a client that does not read is closed"),
    _opt("rate_limit", _positive(_float), 50.0, G, "client frames per second per connection (token bucket rate)"),
    _opt("rate_burst", _positive(_int), 100, G, "token bucket size for --rate-limit"),
    _opt("compression", _bool, True, G, "accept permessage-deflate"),
    _opt("external_port", _non_negative(_int), 0, G,
         "port clients see when behind a load balancer (0: the listening port)"),
    _opt("trust_proxy", _bool, False, G, "take the client address from X-Forwarded-For / X-Real-IP"),
    _opt("publish_batch", _positive(_int), 200, G | A, "client frames coalesced into one AMQP publish"),
    _opt("resync_rate", _positive(_float), 2000.0, G,
         "connections per second a gateway asks the processors to sync again after its queue or its "
         "Redis entries were lost (deliveries routed meanwhile were lost with them)"),
    _opt("close_timeout", _positive(_float), 5.0, G,
         "seconds a closing client connection may take to flush its last frames before it is dropped"),
    _opt("max_json_depth", _positive(_int), 64, G | P | A,
         "deepest nesting of arrays/objects accepted in a client frame (bad_frame beyond)"),
    _opt("slow_consumer_grace", _non_negative(_float), 1.0, G,
         "seconds a client's pending output may stay above output_buffer_limit (a burst) before "
         "it is closed as a slow consumer, unless it took at least output_buffer_limit bytes "
         "meanwhile (it is reading: another grace period)"),
    _opt("output_buffer_max", _positive(_int), 67108864, G,
         "bytes of pending output one connection may hold at most, reading or not: past it the "
         "client is closed as a slow consumer at once (bounds a gateway's memory per connection)"),
    _opt("listen_backlog", _positive(_int), 1024, G,
         "accept queue of --ws/--tcp listeners without an explicit backlog= (reconnect storms need room)"),
    _opt("goodbye_timeout", _positive(_float), 5.0, G,
         "seconds a stopping gateway waits for its clients to close after 'going away'"),
    _opt("typing_interval", _non_negative(_float), 1.0, G,
         "seconds between two typing frames a connection may send for one session; the gateway drops "
         "the others silently (0: forward every one)"),
    _opt("presence_max", _positive(_int), 500, G,
         "users one connection may follow with presence_subscribe (too_large beyond)"),
    # --- processor
    _opt("migrate", _bool, False, P, "apply pending migrations on start", flag=True),
    _opt("prefetch", _positive(_int), 1000, G | P | A,
         "unacknowledged queue messages a processor (or gateway, or the API's reply queue) holds"),
    _opt("batch_size", _positive(_int), 500, P, "client frames handled in one transaction"),
    _opt("batch_wait", _non_negative(_float), 0.002, P, "seconds a batch waits to fill"),
    _opt("windows", _positive(_int), 2, P,
         "batches a processor runs at once, the second only when a full batch waits (seq numbers and deliveries keep the order they started in)"),
    _opt("max_group_size", _positive(_int), 1000, P | A, "members a session may have"),
    _opt("recall_window", _non_negative(_float), 120.0, P,
         "seconds after a message's ts within which its sender may recall it (the HTTP API's admin: any time)"),
    _opt("edit_window", _non_negative(_float), 86400.0, P,
         "seconds after a message's ts within which its sender may edit it"),
    _opt("sync_page_size", _positive(_int), 500, P, "undelivered messages read per sync page"),
    _opt("retry_delay", _positive(_float), 0.5, G | P, "first retry delay in seconds after a failure"),
    _opt("retry_max_delay", _positive(_float), 30.0, G | P, "longest retry delay in seconds"),
    _opt("max_attempts", _positive(_int), 5, P,
         "attempts at a message that fails deterministically before it is dead-lettered"),
    _opt("sync_concurrency", _positive(_int), 16, P,
         "syncs (paged undelivered backlogs) one processor runs at once"),
    _opt("unroutable_hold", _positive(_float), 5.0, P,
         "seconds a processor stops routing to a gateway whose queue was unroutable"),
    _opt("poison_after", _positive(_float), 60.0, P,
         "seconds an item may keep failing while other work succeeds before it is answered with an "
         "error and dead-lettered to <ns>.dead (it never holds up the items behind it longer)"),
    _opt("redeliver_interval", _non_negative(_float), 2.0, P,
         "seconds between sweeps that deliver again rows left pending/sending to users who are "
         "online (0: no sweep)"),
    _opt("redeliver_age", _positive(_float), 3.0, P,
         "seconds a row must have been left undelivered before the sweep delivers it again"),
    _opt("redeliver_batch", _positive(_int), 2000, P, "rows one sweep pass reads at most"),
    _opt("moderation_action", _choice("reject", "replace"), "reject", P | A,
         "what the keyword filter does with a match: reject the message, or replace the words with *"),
    _opt("filters", _str_list, ["keyword"], P | A,
         "moderation filters in order: plugin names or dotted names"),
    _opt("moderation_words", _str, None, P | A, "word list file for the keyword filter (one word a line)"),
    _opt("presence_check", _non_negative(_float), 1.0, P,
         "seconds between a processor's checks that each gateway's presence connection to Redis is "
         "open (0: none; dead gateways then go offline only when WSSERVER_<uuid> expires)"),
    _opt("presence_grace", _positive(_float), 4.0, P,
         "seconds a gateway's presence connection may stay closed before its users are offline and "
         "its entries are removed (a gateway killed without exiting)"),
    # --- calls to business servers (HTTP-API.md "Calls the cluster makes to business servers")
    _opt("moderation_url", _url("http", "https"), None, P,
         "moderation service called (signed JSON POST) for each message before it is stored, after the "
         "filters; it answers accept, reject or replace (empty: no call)"),
    _opt("moderation_timeout", _positive(_float), 2.0, P,
         "seconds a moderation call may take; then moderation_failure applies"),
    _opt("moderation_failure", _choice("accept", "reject"), "reject", P,
         "what a message gets when the moderation service times out, errs or answers nonsense"),
    _opt("moderation_concurrency", _positive(_int), 100, P,
         "moderation calls one processor has in flight at once (a window's calls run together up to it)"),
    _opt("webhook_url", _url("http", "https"), None, G | P | A,
         "business server receiving the events (message.stored, session.members, user.online, "
         "user.offline) as signed JSON POSTs, at least once, in order per session (empty: none)"),
    _opt("webhook_events", _webhook_events, list(WEBHOOK_EVENTS),
         G | P | A, "the events sent to webhook_url"),
    _opt("webhook_secret", _str, "", P | {PUSH},
         "HMAC-SHA256 key of the X-Imcluster-Signature header of moderation calls and webhooks",
         secret=True),
    _opt("webhook_retry", _positive(_float), 3600.0, P,
         "seconds an event is retried (with backoff) before it is dead-lettered to <ns>.dead"),
    _opt("webhook_timeout", _positive(_float), 10.0, P, "seconds one webhook call may take"),
    _opt("webhook_concurrency", _positive(_int), 32, P,
         "webhook calls one processor makes at once (at most one per session or user at a time)"),
    _opt("webhook_prefetch", _positive(_int), 200, P,
         "queue messages of <ns>.webhooks a processor holds unacknowledged (each a window's events)"),
    _opt("push_url", _url("http", "https"), None, P | {PUSH},
         "push relay for offline recipients (HTTP-API.md; your FCM/APNs relay): with it set, the "
         "processors publish a push request to <ns>.push for every recipient not connected when a message "
         "is stored, and twistd impush POSTs them there (push is off until set)"),
    # --- api
    _opt("http", _endpoints, ["tcp:8090"], A, "HTTP API listening endpoint(s)", multi=True),
    _opt("api_key", _str_list, [], A, "admin key(s) for the HTTP API", secret=True, multi=True),
    _opt("request_timeout", _positive(_float), 10.0, A,
         "seconds a message posted over HTTP waits for the processors' reply, after publish_timeout (then 503)"),
    _opt("health_timeout", _positive(_float), 2.0, G | P | A,
         "seconds each dependency (Redis, RabbitMQ, PostgreSQL) has to answer a /healthz probe"),
    _opt("public_ws_urls", _ws_urls, ["ws://127.0.0.1:8080/ws"], A,
         "gateway WebSocket URL(s) that the web chat at /app/ connects to (browsers reach them)", multi=True),
    _opt("public_stream_urls", _http_urls, ["http://127.0.0.1:8082"], A,
         "gateway HTTP streaming (--stream) URL(s) the web chat falls back to, Server-Sent Events then "
         "long polling, where WebSocket cannot connect (empty: WebSocket only)", multi=True),
    _opt("dev_login", _bool, False, A,
         "DEVELOPMENT ONLY: serve POST /v1/dev/login, which hands anyone a token for any user "
         "(needs jwt_secret)", flag=True),
    _opt("dev_login_ttl", _positive(_float), 86400.0, A, "seconds a development login token is valid"),
    # --- push and operator controls
    _opt("revoke_ttl", _positive(_float), 2592000.0, A,
         "seconds a revocation (POST /v1/users/{id}/revoke) is kept in Redis (REVOKED##<user>): at "
         "least the longest lifetime of a token you issue"),
    _opt("push_timeout", _positive(_float), 10.0, {PUSH}, "seconds one push request may take"),
    _opt("push_retry", _positive(_float), 3600.0, {PUSH},
         "seconds a push request is retried (with backoff) before it is dead-lettered to <ns>.dead"),
    _opt("push_retry_delay", _positive(_float), 1.0, {PUSH}, "first retry delay of a failed push request"),
    _opt("push_retry_max_delay", _positive(_float), 300.0, {PUSH}, "longest retry delay of a push request"),
    _opt("push_hold", _positive(_float), 600.0, {PUSH},
         "seconds an impush keeps one AMQP message of <ns>.push unacknowledged while its requests are "
         "retried; then they are published again with their first attempt's time (below RabbitMQ's "
         "consumer_timeout, 30 min by default)"),
    _opt("push_concurrency", _positive(_int), 16, {PUSH}, "push requests one impush has in flight at once"),
    _opt("push_prefetch", _positive(_int), 64, {PUSH},
         "unacknowledged AMQP messages of <ns>.push one impush holds (each may hold many requests)"),
    _opt("retention_days", _non_negative(_float), 0.0, P,
         "days after which processors delete delivered messagesend rows and messagerecv rows, in "
         "small batches, one processor at a time (0: keep everything; imcluster prune does it by hand)"),
    _opt("retention_delivered_days", _non_negative(_float), 0.0, P,
         "with retention_days: also delete messagesend rows delivered more than this many days ago "
         "while their message is kept (0: they go with their message)"),
    _opt("retention_batch", _positive(_int), 1000, P, "rows one retention (prune) delete removes at most"),
    _opt("retention_interval", _positive(_float), 60.0, P, "seconds between retention passes of a processor"),
    # --- http
    _opt("max_body_size", _positive(_int), 1048576, G | P | A,
         "largest HTTP request body in bytes (imapi, and every --metrics listener)"),
    _opt("http_idle_timeout", _positive(_float), 60.0, G | P | A,
         "seconds an idle HTTP connection (nothing received, no request in progress) is kept open"),
    _opt("http_header_timeout", _positive(_float), 10.0, G | P | A,
         "seconds in which an HTTP request line and all its headers must arrive, counted from the "
         "connection's start or, on a kept-alive connection, from the request's first byte; then "
         "408 and close (imcluster_http_timeouts_total)"),
    _opt("http_body_timeout", _positive(_float), 60.0, G | P | A,
         "seconds in which an HTTP request body must arrive once its headers have; then 408 and close"),
]

#: the shared options twistd impush reads too (it has no Redis and no client listener)
_PUSH_SHARED = frozenset({
    "namespace", "amqp", "amqp_password", "queue_type", "publish_timeout", "publish_backlog", "max_publish_bytes",
    "postgres", "postgres_password", "postgres_schema", "postgres_pool_size", "postgres_timeout",
    "postgres_statement_timeout", "shutdown_timeout", "metrics", "health_timeout", "max_json_depth",
    "max_body_size", "http_idle_timeout", "http_header_timeout", "http_body_timeout",
})
OPTIONS = [Option(o.name, o.parse, o.default, o.daemons | {PUSH}, o.help, o.secret, o.multi, o.flag)
           if o.name in _PUSH_SHARED else o for o in OPTIONS]

OPTIONS_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
SECRET_PATH_KEYS: dict[str, Option] = {o.name + "_path": o for o in OPTIONS if o.secret}


@dataclass
class Config:
    """Resolved settings of one daemon: attributes named as the options."""

    daemon: str
    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> "Config":
        values = dict(self.values)
        values.update(changes)
        return Config(self.daemon, values, dict(self.sources), self.path)


def options_for(daemon: str) -> list[Option]:
    return [o for o in OPTIONS if daemon in o.daemons]


def _read_secret_file(path: str, key: str, source: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise ConfigError(f"{key} ({source}): cannot read {path}: {e.strerror}") from None


def _parse(option: Option, raw: Any, source: str) -> Any:
    try:
        return option.parse(raw)
    except ValueError as e:
        raise ConfigError(f"{option.name} ({source}): {e}") from None


def load_config(
    daemon: str,
    cli: Mapping[str, Any] | None = None,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Config:
    """Resolve the settings of ``daemon``.

    ``cli`` maps option names to raw values given on the command line (absent
    or None: not given).  Raises :class:`ConfigError` on any unknown key or
    bad value in the file or on the command line, naming both. An unknown
    ``IMCLUSTER_*`` environment variable is only reported to ``warn``
    (default: a twisted.logger warning), as other tools share the
    environment (ARCHITECTURE.md "Failure rules").
    """
    cli = dict(cli or {})
    if warn is None:
        warn = _log_warning
    environ = os.environ if environ is None else environ
    wanted = {o.name: o for o in options_for(daemon)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def put(key: str, raw: Any, source: str) -> None:
        if key in SECRET_PATH_KEYS:
            option = SECRET_PATH_KEYS[key]
            if not isinstance(raw, str):
                raise ConfigError(f"{key} ({source}): expected a file path, got {raw!r}")
            if option.name not in wanted:
                # another daemon's secret: its file may be readable by that daemon only
                return
            raw = _read_secret_file(raw, key, source)
            if option.parse is _str_list:
                raw = [line.strip() for line in raw.splitlines() if line.strip()]
        else:
            option = OPTIONS_BY_NAME.get(key)
            if option is None:
                raise ConfigError(f"unknown option {key!r} ({source})")
        parsed = _parse(option, raw, source)
        if option.name not in wanted:
            # another daemon's setting in a shared file: checked (a typo shows at the
            # first start of any daemon), not kept
            return
        values[option.name] = parsed
        sources[option.name] = source

    # file, then environment, then command line: later wins
    if config_path is None:
        config_path = environ.get(ENV_PREFIX + "CONFIG") or None
    if config_path:
        try:
            with open(config_path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read configuration file {config_path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"configuration file {config_path} is not valid TOML: {e}") from None
        for key, raw in data.items():
            if isinstance(raw, dict):
                raise ConfigError(
                    f"unknown section [{key}] (file {config_path}): options are top-level keys")
            put(key, raw, f"file {config_path}")
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX):].lower()
        if key not in OPTIONS_BY_NAME and key not in SECRET_PATH_KEYS:
            # other tools (deploy scripts, CI) set IMCLUSTER_* variables of their own
            warn(f"ignoring environment variable {name}: {key!r} is no imcluster option")
            continue
        put(key, raw, f"environment variable {name}")
    for key, raw in cli.items():
        if raw is None or raw == []:
            continue
        put(key, raw, f"command line --{key.replace('_', '-')}")

    for name, option in wanted.items():
        if name not in values:
            values[name] = option.default_for(daemon)
            sources[name] = "default"
    config = Config(daemon, values, sources, config_path)
    _check_together(config)
    return config


def _log_warning(message: str) -> None:
    from twisted.logger import Logger

    Logger(namespace="imcluster.config").warn("{message}", message=message)


def _check_together(config: Config) -> None:
    """Rules that involve more than one option."""
    v = config.values
    if config.daemon in (GATEWAY, API):
        if not v.get("jwt_secret") and not v.get("jwt_public_key"):
            raise ConfigError(
                "jwt_secret or jwt_public_key is required: give --jwt-secret, --jwt-secret-path, "
                "--jwt-public-key, IMCLUSTER_JWT_SECRET, or jwt_secret in the configuration file")
        if v.get("jwt_secret") and v.get("jwt_public_key"):
            raise ConfigError("give jwt_secret or jwt_public_key, not both")
        if v.get("jwt_public_key") and not os.path.isfile(v["jwt_public_key"]):
            raise ConfigError(
                f"jwt_public_key ({config.sources['jwt_public_key']}): no such file {v['jwt_public_key']}")
    if "server_ttl" in v and "heartbeat" in v and v["server_ttl"] <= v["heartbeat"]:
        raise ConfigError(
            f"server_ttl ({config.sources['server_ttl']}) must be greater than heartbeat "
            f"({v['server_ttl']} <= {v['heartbeat']}), or live gateways would expire")


def with_password(url: str, password: str | None) -> str:
    """``url`` with its password replaced (used for the ``*_password`` secrets)."""
    if not password:
        return url
    parts = urlsplit(url)
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def postgres_dsn(config: Config, dsn: str | None = None) -> str:
    """The libpq DSN of ``config`` (or ``dsn``, e.g. a replica's) with ``postgres_password`` applied."""
    dsn = config.postgres if dsn is None else dsn
    password = config.values.get("postgres_password")
    if "://" in dsn:
        return with_password(dsn, password)
    if password:
        dsn += " password='%s'" % password.replace("\\", "\\\\").replace("'", "\\'")
    return dsn


# --- twistd / command-line integration


def make_options(daemon: str, synopsis: str,
                 check: Callable[[Config], Any] | None = None) -> type[usage.Options]:
    """A ``usage.Options`` class for ``daemon`` built from :data:`OPTIONS`.

    ``postOptions`` resolves the whole configuration and stores it as
    ``self.config``; any :class:`ConfigError` becomes a ``UsageError`` so that
    twistd prints it and exits non-zero before anything starts. ``check``
    (optional) validates the resolved configuration further (for example
    loads the JWT key); a ``ValueError`` it raises is reported the same way,
    and what it returns is kept as ``self.checked``.
    """
    params = [["config", "c", None, "TOML configuration file"]]
    flags: list[list[Any]] = []
    multi: list[Option] = []
    opts = options_for(daemon)
    for o in opts:
        help_text = o.help
        default = o.default_for(daemon)
        if default not in (None, [], ""):
            shown = ",".join(default) if isinstance(default, list) else default
            help_text += f" [default: {shown}]"
        if o.flag:
            flags.append([o.cli, None, help_text])
        elif o.multi:
            multi.append(o)
        else:
            params.append([o.cli, None, None, help_text])
        if o.secret:
            params.append([o.cli + "-path", None, None, f"file holding {o.name}"])

    class DaemonOptions(usage.Options):
        synopsis_text = synopsis
        optParameters = params
        optFlags = flags

        def __init__(self) -> None:
            super().__init__()
            for o in multi:
                self[o.name] = []
            self.config: Config | None = None

        def getSynopsis(self) -> str:
            return synopsis

        def postOptions(self) -> None:
            cli: dict[str, Any] = {}
            for o in opts:
                if o.flag:
                    if self.get(o.cli):
                        cli[o.name] = True
                    continue
                value = self.get(o.name) if o.multi else self.get(o.cli)
                if value not in (None, []):
                    cli[o.name] = value
                if o.secret and self.get(o.cli + "-path") is not None:
                    cli[o.name + "_path"] = self[o.cli + "-path"]
            try:
                self.config = load_config(daemon, cli, self.get("config"))
                # what the check built (e.g. the authenticator) is kept for makeService
                self.checked = check(self.config) if check is not None else None
            except ValueError as e:  # ConfigError included
                raise usage.UsageError(str(e)) from None

    for o in multi:
        setattr(DaemonOptions, "opt_" + o.name, _appender(o))
    DaemonOptions.__name__ = f"{daemon.capitalize()}Options"
    return DaemonOptions


def _appender(option: Option) -> Callable[[usage.Options, str], None]:
    def opt(self: usage.Options, value: str) -> None:
        self[option.name].append(value)

    opt.__doc__ = option.help + " (may be repeated)"
    return opt


def describe(options: Iterable[Option] = OPTIONS) -> str:
    """Human-readable list of options (for docs and ``--help``)."""
    return "\n".join(f"{o.name}: {o.help}" for o in options)
