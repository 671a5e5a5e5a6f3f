"""The HTTP API of HTTP-API.md on twisted.web: routing, authentication, authorization, answers.

Every answer is JSON; every error is ``{"error":{"code","message"}}`` with
the status of :data:`ERROR_CODES`. Request handling, in order:

1. a body over ``max_body_size`` bytes: 413 (the rest of it is read and
   dropped, never buffered);
2. the route: an unknown path is 404, a known path with another method 405;
3. ``/healthz``, ``/metrics`` and ``/openapi.json`` need no credential;
   everything under ``/v1`` needs ``Authorization: Bearer <credential>``:
   an admin key (compared in constant time with each configured key) or a
   user's JWT (:class:`imcluster.auth.JWTAuthenticator`, as gateways verify
   it); missing or bad: 401;
4. the body's JSON (malformed: 400), then the resource: a session that does
   not exist is 404 for everyone (the 1:1 session ``p2p:<a>:<b>`` exists
   implicitly), an existing one the caller may not see or change 403.

Sessions, members, history and a user's sessions are read and written
through :class:`imcluster.store.postgres.MessageStore`; messages go through
the processors' pipeline (:class:`imcluster.api.publisher.MessagePublisher`);
presence comes from the Redis connection index, counting only gateways that
are alive.
"""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass
from importlib import resources as package_resources
from typing import Any, Callable, Iterable
from urllib.parse import parse_qs, unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from imcluster import metrics
from imcluster.api.control import ControlResources
from imcluster.auth import AuthError
from imcluster.protocol import check_json_value, is_client_msg_id, message_frame_size
from imcluster.store import (
    StoreError, StoreUnavailable, check_member_change, parse_msg_id, parse_p2p, valid_session_id, valid_user_id,
)
from imcluster.web import GuardedSite, HealthResource, metrics_resource, write_json

#: HTTP-API.md "Errors": status -> code
ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "too_large", 429: "rate_limited", 500: "internal", 503: "unavailable",
}

#: StoreError codes -> HTTP status
STORE_STATUS = {"no_session": 404, "not_member": 403, "conflict": 409, "too_large": 413, "bad_request": 400}

#: ``message_reply`` error codes (PROTOCOL.md) -> HTTP status; the reply's code leads the message
REPLY_STATUS = {
    "not_member": 403, "rejected": 403, "no_session": 404, "bad_frame": 400, "too_large": 413,
    "rate_limited": 429, "unavailable": 503,
    # recall (PROTOCOL.md 1.1)
    "not_allowed": 403, "no_message": 404,
}

#: the sender of messages the admin key posts without ``from``
SYSTEM_USER = "system"

_INT_RE = re.compile(r"[0-9]{1,19}\Z")
_INT64_MAX = 2**63 - 1


class APIError(Exception):
    """An answer other than success: ``status`` and a human-readable ``message``."""

    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    @property
    def code(self) -> str:
        return ERROR_CODES.get(self.status, "bad_request")


def error_body(status: int, message: str) -> dict:
    """``{"error":{"code","message"}}`` for ``status``."""
    return {"error": {"code": ERROR_CODES.get(status, "bad_request"), "message": message}}


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user (``user_id``) or the admin key (``admin``)."""

    user_id: str | None
    admin: bool = False

    def __str__(self) -> str:
        return "admin" if self.admin else str(self.user_id)


ADMIN = Principal(None, admin=True)


class AdminKeys:
    """The configured admin keys; :meth:`matches` compares in constant time against every one."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode("utf-8") for k in keys if k]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def matches(self, credential: str) -> bool:
        try:
            given = credential.encode("utf-8")
        except UnicodeEncodeError:
            return False
        found = False
        for key in self._keys:
            # no early exit: the time taken does not tell which key, or how much of one, matched
            found |= hmac.compare_digest(key, given)
        return found


# --- the site --------------------------------------------------------------------------


class APISite(GuardedSite):
    """The imapi site: a :class:`~imcluster.web.GuardedSite` (header and body deadlines, bounded
    bodies, ``max_connections``, JSON errors) without an access log.

    Requests are counted in ``imcluster_http_requests_total`` (method,
    route, status) instead of a log line each; failures are logged where
    they happen.
    """


# --- routing ---------------------------------------------------------------------------

ID = object()  # a path segment that is a parameter


@dataclass(frozen=True)
class Route:
    method: str
    pattern: tuple
    template: str
    handler: str
    auth: bool = True


ROUTES = [
    Route("POST", ("v1", "sessions"), "/v1/sessions", "create_session"),
    Route("GET", ("v1", "sessions", ID), "/v1/sessions/{id}", "get_session"),
    Route("POST", ("v1", "sessions", ID, "members"), "/v1/sessions/{id}/members", "change_members"),
    Route("GET", ("v1", "sessions", ID, "messages"), "/v1/sessions/{id}/messages", "history"),
    Route("POST", ("v1", "sessions", ID, "messages"), "/v1/sessions/{id}/messages", "publish"),
    Route("POST", ("v1", "sessions", ID, "messages", ID, "recall"), "/v1/sessions/{id}/messages/{msgId}/recall",
          "recall"),
    Route("GET", ("v1", "sessions", ID, "read"), "/v1/sessions/{id}/read", "read_cursors"),
    Route("GET", ("v1", "users", ID, "sessions"), "/v1/users/{id}/sessions", "user_sessions"),
    Route("GET", ("v1", "users", ID, "presence"), "/v1/users/{id}/presence", "presence"),
    # HTTP-API.md 1.1: operator controls and push targets (imcluster/api/control.py)
    Route("POST", ("v1", "users", ID, "kick"), "/v1/users/{id}/kick", "kick"),
    Route("POST", ("v1", "users", ID, "revoke"), "/v1/users/{id}/revoke", "revoke"),
    Route("PUT", ("v1", "users", ID, "devices", ID), "/v1/users/{id}/devices/{deviceId}", "put_device"),
    Route("DELETE", ("v1", "users", ID, "devices", ID), "/v1/users/{id}/devices/{deviceId}", "delete_device"),
    Route("GET", ("healthz",), "/healthz", "healthz", auth=False),
    Route("GET", ("metrics",), "/metrics", "metrics", auth=False),
    Route("GET", ("openapi.json",), "/openapi.json", "openapi", auth=False),
]


def _segments(path: bytes) -> list[str] | None:
    """The decoded segments of a request path, or None when one is not UTF-8."""
    if not path.startswith(b"/"):
        return None
    try:
        return [unquote_to_bytes(s).decode("utf-8") for s in path[1:].split(b"/")]
    except UnicodeDecodeError:
        return None


def match(method: str, segments: list[str]) -> tuple[Route | None, list[str], list[str]]:
    """``(route, params, allowed methods)``: route None with methods: 405; without: 404."""
    allowed: list[str] = []
    for route in ROUTES:
        if len(route.pattern) != len(segments):
            continue
        params = []
        for want, got in zip(route.pattern, segments):
            if want is ID:
                params.append(got)
            elif want != got:
                break
        else:
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, params, []
            allowed.append(route.method)
    return None, [], allowed


def openapi_document() -> bytes:
    """The OpenAPI 3 document shipped in this package (``imcluster/api/openapi.json``)."""
    return package_resources.files("imcluster.api").joinpath("openapi.json").read_bytes()


# --- the API ------------------------------------------------------------------------------------


class APIResource(ControlResources, resource.Resource):
    """The whole of imapi's HTTP surface as one leaf resource (see the module docstring).

    ``store``: IMessageStore; ``registry``: IRegistry; ``publisher``:
    :class:`~imcluster.api.publisher.MessagePublisher`; ``authenticator``:
    IAuthenticator; ``admin_keys``: the configured keys; ``probes``: the
    /healthz probes (:func:`imcluster.web.dependency_probes`).
    """

    isLeaf = True
    log = Logger()

    def __init__(self, store: Any, registry: Any, publisher: Any, authenticator: Any,
                 admin_keys: Iterable[str], probes: dict, health_timeout: float = 2.0,
                 max_json_depth: int = 64, clock: Any = None, max_frame_size: int = 65536) -> None:
        super().__init__()
        self.store = store
        self.registry = registry
        self.publisher = publisher
        self.authenticator = authenticator
        self.admin_keys = AdminKeys(admin_keys)
        self.max_json_depth = max_json_depth
        self.max_frame_size = max_frame_size
        self.health = HealthResource(probes, health_timeout, clock)
        self.metrics = metrics_resource()
        self._openapi: bytes | None = None
        self._decoder = json.JSONDecoder(parse_constant=_reject_constant)
        #: publishes session.members of sessions created here (imcluster.api.events.SessionEvents; None:
        #: off); member changes go through the processors, which publish theirs
        self.session_events: Any = None

    # --- dispatch

    def render(self, request: Any) -> Any:
        started = time.monotonic()
        method = request.method.decode("ascii", "replace")
        segments = _segments(request.path)
        route, params, allowed = match(method, segments) if segments is not None else (None, [], [])
        template = route.template if route is not None else "other"

        def count(status: int) -> None:
            metrics.HTTP_REQUESTS.labels(method=method if route is not None else "other",
                                         route=template, status=str(status)).inc()
            metrics.HTTP_LATENCY.labels(route=template).observe(time.monotonic() - started)

        if request.body_too_large:
            return self._error(request, APIError(413, f"the body is over {request.channel.site.max_body_size} bytes"),
                               count)
        if route is None:
            if allowed:
                e = APIError(405, f"{method} is not allowed here; use {', '.join(sorted(set(allowed)))}",
                             {b"allow": ", ".join(sorted(set(allowed))).encode()})
            else:
                e = APIError(404, "no such resource")
            return self._error(request, e, count)
        if not route.auth:
            count(200)
            return getattr(self, "render_" + route.handler)(request)

        async def run() -> tuple[int, Any]:
            principal = self.authenticate(request)
            return await getattr(self, route.handler)(request, principal, *params)

        d = defer.Deferred.fromCoroutine(run())

        def answered(result: tuple[int, Any]) -> None:
            status, body = result
            count(status)
            if status == 204:  # no content (DELETE of a device)
                if not getattr(request, "_disconnected", False) and not request.finished:
                    request.setResponseCode(204)
                    request.finish()
                return
            write_json(request, status, body)

        def failed(f: Failure) -> None:
            self._error(request, self._api_error(f, route), count)

        d.addCallbacks(answered, failed)
        d.addErrback(lambda f: self.log.failure("answering {path} failed", f, path=request.path))
        return server.NOT_DONE_YET

    def _error(self, request: Any, e: APIError, count: Callable[[int], None]) -> Any:
        count(e.status)
        headers = dict(e.headers)
        write_json(request, e.status, error_body(e.status, e.message), headers)
        return server.NOT_DONE_YET

    def _api_error(self, f: Failure, route: Route) -> APIError:
        e = f.value
        if isinstance(e, APIError):
            return e
        if isinstance(e, StoreError):
            return APIError(STORE_STATUS.get(e.code, 400), e.message)
        if isinstance(e, StoreUnavailable):
            self.log.warn("{route}: PostgreSQL unavailable: {err}", route=route.template, err=str(e))
            return APIError(503, "PostgreSQL is unavailable; retry later")
        from imcluster.api.publisher import PublishUnavailable
        from imcluster.registry import RegistryUnavailable

        if isinstance(e, PublishUnavailable):
            self.log.warn("{route}: {err}", route=route.template, err=str(e))
            return APIError(503, f"the message was not handled: {e}; retry with the same clientMsgId")
        if isinstance(e, (TimeoutError, RegistryUnavailable, defer.TimeoutError)):
            self.log.warn("{route}: {err}", route=route.template, err=str(e))
            return APIError(503, f"a backing service did not answer: {e}")
        self.log.failure("{route}: unexpected error", f, route=route.template)
        return APIError(500, "internal error")

    # --- unauthenticated resources

    def render_healthz(self, request: Any) -> Any:
        return self.health.render_GET(request)

    def render_metrics(self, request: Any) -> Any:
        return self.metrics.render_GET(request)

    def render_openapi(self, request: Any) -> bytes:
        if self._openapi is None:
            self._openapi = openapi_document()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", str(len(self._openapi)).encode())
        return self._openapi

    # --- authentication and request bodies

    def authenticate(self, request: Any) -> Principal:
        """The caller of ``request`` (``Authorization: Bearer``), else APIError 401."""
        challenge = {b"www-authenticate": b'Bearer realm="imcluster"'}
        header = request.getHeader(b"authorization")
        if not header:
            raise APIError(401, "an Authorization: Bearer credential is required", challenge)
        try:
            text = header.decode("utf-8") if isinstance(header, bytes) else header
        except UnicodeDecodeError:
            raise APIError(401, "the credential is not valid", challenge) from None
        scheme, _, credential = text.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise APIError(401, "use Authorization: Bearer <credential>", challenge)
        if self.admin_keys.matches(credential):
            return ADMIN
        try:
            identity = self.authenticator.authenticate(credential)
        except AuthError as e:
            raise APIError(401, e.message, challenge) from None
        return Principal(identity.user_id)

    def json_object(self, request: Any) -> dict:
        """The request body as a JSON object, else APIError 400."""
        raw = request.content.getvalue() if hasattr(request.content, "getvalue") else request.content.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "the body is not UTF-8") from None
        if not text.strip():
            raise APIError(400, "a JSON object body is required")
        try:
            value = self._decoder.decode(text)
        except RecursionError:
            raise APIError(400, "the body is nested too deeply") from None
        except ValueError as e:
            raise APIError(400, f"the body is not JSON: {e}") from None
        if not isinstance(value, dict):
            raise APIError(400, "the body must be a JSON object")
        why = check_json_value(value, self.max_json_depth)
        if why is not None:
            raise APIError(400, why)
        return value

    @staticmethod
    def query_int(request: Any, name: str, minimum: int) -> int | None:
        """Query parameter ``name`` as an integer >= ``minimum``; None when absent or empty."""
        query = request.uri.partition(b"?")[2].decode("utf-8", "replace")
        values = parse_qs(query, keep_blank_values=True).get(name)
        if not values or values[-1] == "":
            return None
        value = values[-1]
        if not _INT_RE.match(value) or int(value) > _INT64_MAX or int(value) < minimum:
            raise APIError(400, f"{name} must be an integer >= {minimum}")
        return int(value)

    # --- sessions

    async def session(self, session_id: str, principal: Principal) -> dict:
        """The session (``get_session`` shape, ``implicit`` for a 1:1 session not created yet).

        APIError 404 when it does not exist, 403 when the caller is neither
        a member nor the admin.
        """
        if not valid_session_id(session_id):
            raise APIError(404, "no such session")
        try:
            info = await self.store.get_session(session_id)
            info["implicit"] = False
        except StoreError as e:
            if e.code != "no_session":
                raise
            pair = parse_p2p(session_id)
            if pair is None:
                raise APIError(404, "no such session") from None
            info = {"sessionId": session_id, "kind": "p2p", "members": list(pair), "owners": [],
                    "lastSeq": 0, "implicit": True}
        if not principal.admin and principal.user_id not in info["members"]:
            raise APIError(403, "only the session's members (or the admin key) may see it")
        return info

    async def create_session(self, request: Any, principal: Principal) -> tuple[int, dict]:
        body = self.json_object(request)
        members = body.get("members")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise APIError(400, "members must be a list of user ids")
        session_id = body.get("sessionId")
        if "sessionId" in body and not isinstance(session_id, str):
            raise APIError(400, "sessionId must be a string")
        kind = body.get("kind", "group")
        if kind not in ("group", "p2p"):
            raise APIError(400, "kind must be group or p2p")
        creator = None if principal.admin else principal.user_id
        session_id, everyone = await self.store.create_session(creator, members, session_id, kind)
        kind = "p2p" if parse_p2p(session_id) is not None else "group"
        if self.session_events is not None and kind == "group":
            await self.session_events.members(session_id, everyone, [])
        self.log.info("session {session} created by {who} with {n} members", session=session_id,
                      who=str(principal), n=len(everyone))
        return 201, {"sessionId": session_id, "kind": kind, "members": everyone}

    async def get_session(self, request: Any, principal: Principal, session_id: str) -> tuple[int, dict]:
        info = await self.session(session_id, principal)
        return 200, {k: info[k] for k in ("sessionId", "kind", "members", "lastSeq")}

    async def change_members(self, request: Any, principal: Principal, session_id: str) -> tuple[int, dict]:
        body = self.json_object(request)
        add, remove = body.get("add", []), body.get("remove", [])
        for name, value in (("add", add), ("remove", remove)):
            if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
                raise APIError(400, f"{name} must be a list of user ids")
        info = await self.session(session_id, principal)
        if not principal.admin and principal.user_id not in info["owners"]:
            raise APIError(403, "only the session's owners (or the admin key) change its members")
        if info["kind"] == "p2p":
            if add or remove:
                raise APIError(400, "the members of a p2p session do not change")
            return 200, {"members": info["members"]}
        try:
            add, remove = check_member_change(add, remove)
        except StoreError as e:
            raise APIError(400, e.message) from None
        if not add and not remove:
            return 200, {"members": info["members"]}
        # through the processors: the change is a ``members`` event in the session's seq,
        # delivered to the members (and to those removed) like a message (PROTOCOL.md 1.1)
        frame = {"type": "members", "sessionId": session_id, "add": add, "remove": remove,
                 "clientMsgId": f"members:{uuid.uuid4().hex}"}
        reply = await self._processed(SYSTEM_USER if principal.admin else principal.user_id, frame, True)
        self.log.info("session {session} members changed by {who}: +{add} -{remove}", session=session_id,
                      who=str(principal), add=len(add), remove=len(remove))
        return 200, {"members": reply["members"]}

    async def _processed(self, user_id: str, frame: dict, trusted: bool) -> dict:
        """The processors' ``ok`` reply to ``frame`` (imapi's publisher), else the APIError its code says."""
        reply = await self.publisher.request(user_id, frame, trusted=trusted)
        if reply.get("ok") is not True:
            error = reply.get("error") if isinstance(reply.get("error"), dict) else reply
            code = str(error.get("code") or "unavailable")
            raise APIError(REPLY_STATUS.get(code, 503), f"{code}: {error.get('message') or code}")
        return reply

    async def recall(self, request: Any, principal: Principal, session_id: str, msg_id: str) -> tuple[int, dict]:
        """HTTP-API.md: the sender within ``recall_window``, or the admin key at any time."""
        await self.session(session_id, principal)
        if parse_msg_id(msg_id) is None:
            raise APIError(404, "no such message")
        frame = {"type": "recall", "msgId": str(parse_msg_id(msg_id)), "sessionId": session_id}
        reply = await self._processed(SYSTEM_USER if principal.admin else principal.user_id, frame,
                                      principal.admin)
        self.log.info("message {msg} of {session} recalled by {who}", msg=msg_id, session=session_id,
                      who=str(principal))
        return 201, {"msgId": reply["msgId"], "seq": reply["seq"]}

    async def read_cursors(self, request: Any, principal: Principal, session_id: str) -> tuple[int, dict]:
        """Every member's read cursor (HTTP-API.md); members and the admin key."""
        await self.session(session_id, principal)
        return 200, {"sessionId": session_id, "cursors": await self.store.read_cursors(session_id)}

    async def history(self, request: Any, principal: Principal, session_id: str) -> tuple[int, dict]:
        before = self.query_int(request, "beforeSeq", 0)
        limit = self.query_int(request, "limit", 1)
        if not valid_session_id(session_id):
            raise APIError(404, "no such session")
        try:
            messages = await self.store.history(principal.user_id, session_id, before, limit)
        except StoreError as e:
            if e.code == "no_session" and parse_p2p(session_id) is not None:
                # the 1:1 session exists implicitly; the store answers its two users (and the admin)
                raise APIError(403, "only the session's members (or the admin key) may read it") from None
            raise
        return 200, {"sessionId": session_id, "messages": messages}

    async def publish(self, request: Any, principal: Principal, session_id: str) -> tuple[int, dict]:
        body = self.json_object(request)
        client_msg_id = body.get("clientMsgId")
        if not is_client_msg_id(client_msg_id):
            raise APIError(400, "clientMsgId must be a string of 1-64 characters")
        if "body" not in body:
            raise APIError(400, "body is required (any JSON value)")
        if "from" in body and not valid_user_id(body["from"]):
            raise APIError(400, "from must be a user id (1-128 of A-Z a-z 0-9 _ . @ -)")
        # the session first: one that does not exist is 404 for everyone, whatever else is wrong
        await self.session(session_id, principal)
        # no larger than a client's message frame may be (HTTP-API.md), whatever the request body's limit
        size = message_frame_size(session_id, client_msg_id, body["body"])
        if size > self.max_frame_size:
            metrics.API_MESSAGES.labels(result="too_large").inc()
            raise APIError(413, f"the message is {size} bytes as a client message frame; the limit is "
                                f"{self.max_frame_size} (max_frame_size)")
        sender = body.get("from")
        if principal.admin:
            sender = sender or SYSTEM_USER
        elif sender is not None and sender != principal.user_id:
            raise APIError(403, "only the admin key may send as another user")
        else:
            sender = principal.user_id
        reply, duplicate = await self.publisher.publish(sender, session_id, client_msg_id, body["body"],
                                                        trusted=principal.admin)
        if reply.get("type") != "message_reply" or reply.get("ok") is not True:
            error = reply.get("error") if isinstance(reply.get("error"), dict) else reply
            code = str(error.get("code") or "unavailable")
            metrics.API_MESSAGES.labels(result=code if code in REPLY_STATUS else "other").inc()
            raise APIError(REPLY_STATUS.get(code, 503), f"{code}: {error.get('message') or code}")
        metrics.API_MESSAGES.labels(result="duplicate" if duplicate else "created").inc()
        return (200 if duplicate else 201), {k: reply.get(k) for k in ("msgId", "sessionId", "seq", "ts")}

    # --- users

    async def user_sessions(self, request: Any, principal: Principal, user_id: str) -> tuple[int, dict]:
        if not principal.admin and principal.user_id != user_id:
            raise APIError(403, "a user may list only their own sessions")
        if not valid_user_id(user_id):
            raise APIError(400, "not a user id (1-128 of A-Z a-z 0-9 _ . @ -)")
        return 200, {"sessions": await self.store.user_sessions(user_id)}

    async def presence(self, request: Any, principal: Principal, user_id: str) -> tuple[int, dict]:
        if not valid_user_id(user_id):
            raise APIError(400, "not a user id (1-128 of A-Z a-z 0-9 _ . @ -)")
        found = await self.registry.connections_of([user_id])
        entries = []
        for field, meta in (found.get(user_id) or {}).items():
            server_id = field.split("##", 1)[0]
            if server_id:
                entries.append((server_id, meta if isinstance(meta, dict) else {}))
        alive = await self.registry.alive({s for s, _ in entries}) if entries else set()
        connections = [{"serverId": s, "device": m.get("device"), "since": m.get("authedAt")}
                       for s, m in entries if s in alive]
        connections.sort(key=lambda c: (c["since"] if isinstance(c["since"], (int, float)) else 0,
                                        c["serverId"]))
        return 200, {"userId": user_id, "online": bool(connections), "connections": connections}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def make_site(api: resource.Resource, config: Any, reactor: Any = None) -> APISite:
    """The imapi site around ``api``, with ``config``'s HTTP limits and ``max_connections``."""
    return APISite.from_config(api, config, "api", max_connections=config.max_connections, reactor=reactor)


