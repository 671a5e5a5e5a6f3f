"""``imcluster chat``: a terminal chat on :class:`imcluster.client.Client`.

::

    imcluster chat --url ws://127.0.0.1:8080/ws --user alice --secret dev-secret --to bob
    imcluster chat --url tcp://gw1:8081 --url tcp://gw2:8081 --token "$TOKEN" --session team

It joins one session (``--to USER`` for the 1:1 session, ``--session ID``
for any other), shows its latest history, then live messages; a typed line
is sent as ``{"text": line}``. Your own lines show once the server stored
them (``✓``), with ``✓✓`` when a member has read them; read receipts and
connection changes show as ``*`` lines. Messages of other sessions show
with their session's name. With ``--api`` (imapi's URL) it also tells who
of the members is online.

Commands: ``/to USER``, ``/join SESSION``, ``/new USER...`` (a group),
``/history [N]`` (older messages), ``/recall [#N]`` and ``/edit [#N] TEXT``
(your last message, or #N), ``/who``, ``/sessions``, ``/help``, ``/quit``.
Ctrl-C, Ctrl-D on an empty line or ``/quit`` leave cleanly.

Version 1.1 servers add: recalled and edited messages (shown as such, also in
history), membership notices (``* alice added carol``), "bob is typing..."
in front of the prompt (typing is sent, at most once a second, while you
type), live presence of the 1:1 peer or the group's members (``* bob is
online``), and ``✓ delivered`` between ``✓`` (stored) and ``✓✓`` (read) in
1:1 sessions.

On a terminal (tmux included) it edits the input line itself (cbreak mode)
so that incoming messages never break what is being typed; on a pipe it
reads and writes plain lines (one message per input line; end of input
leaves once everything typed has been answered), which makes it scriptable.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import time
from typing import Any
from urllib.parse import quote

from twisted.internet import defer, main
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

# the client (and Autobahn with it) is imported when a chat starts, not when the
# imcluster command builds its parser


def _core() -> Any:
    from imcluster.client import core

    return core

EXIT_OK = 0
EXIT_FAILURE = 1

HISTORY_DEFAULT = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``imcluster chat`` (cli.py adds the subparser and calls :func:`run`)."""
    parser.add_argument("--url", action="append", required=True, metavar="URL",
                        help="gateway URL (ws://, wss://, tcp://, tcps://; http://, https:// "
                             "for the --stream endpoint, long polling); repeat for fallbacks")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="a JWT (or set IMCHAT_TOKEN and give --token -)")
    who.add_argument("--user", help="mint a token for this user with --secret (development)")
    parser.add_argument("--secret", help="HS256 secret for --user (default: $IMCLUSTER_JWT_SECRET)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--to", metavar="USER", help="open the 1:1 session with USER")
    target.add_argument("--session", metavar="ID", help="open the session ID")
    parser.add_argument("--api", metavar="URL", help="imapi's URL (presence, session list), e.g. http://127.0.0.1:8090")
    parser.add_argument("--history", type=int, default=HISTORY_DEFAULT, metavar="N",
                        help=f"messages of history shown on joining (default {HISTORY_DEFAULT})")
    parser.add_argument("--device", default="imcluster-chat", help="device name the gateway records")
    parser.add_argument("--ca", metavar="FILE", help="PEM certificate to trust for wss:// and tcps://")
    parser.add_argument("--verbose", action="store_true", help="log the client's events to standard error")


def _token_source(args: argparse.Namespace) -> tuple[str | None, Any]:
    """``(token, get_token)`` from the command line; SystemExit-free: ValueError on bad input."""
    if args.token is not None:
        token = os.environ.get("IMCHAT_TOKEN", "") if args.token == "-" else args.token
        if not token:
            raise ValueError("--token - needs IMCHAT_TOKEN")
        return token, None
    secret = args.secret or os.environ.get("IMCLUSTER_JWT_SECRET")
    if not secret:
        raise ValueError("--user needs --secret (or IMCLUSTER_JWT_SECRET)")
    from imcluster.auth import mint_token

    user = args.user
    mint_token(secret, user, 60)  # a bad user id fails here, before connecting
    return None, lambda: mint_token(secret, user, 3600)


def describe_body(body: Any) -> str:
    """What a message body shows as: its ``text``, else its JSON."""
    if isinstance(body, dict) and isinstance(body.get("text"), str):
        return body["text"]
    return json.dumps(body, ensure_ascii=False)


def describe_event(m: dict, seqs: dict[str, int] | None = None) -> str:
    """What an event (``kind`` recall, edit, members) shows as, on a ``*`` line."""
    kind, who = m.get("kind"), m.get("from")
    ref = m.get("ref")
    target = f"#{seqs[ref]}" if seqs and ref in seqs else "a message"
    if kind == "recall":
        return f"{who} recalled {target}"
    if kind == "edit":
        return f"{who} edited {target}: {describe_body(m.get('body'))}"
    if kind == "members":
        body = m.get("body") if isinstance(m.get("body"), dict) else {}
        parts = []
        added = [u for u in body.get("added") or [] if isinstance(u, str)]
        removed = [u for u in body.get("removed") or [] if isinstance(u, str)]
        if added:
            parts.append("added " + ", ".join(added))
        if removed:
            parts.append("removed " + ", ".join(removed))
        return f"{who} {' and '.join(parts) or 'changed the members'}"
    return f"{who}: an event of kind {kind!r}"


def _clock(ts: Any) -> str:
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return time.strftime("%H:%M:%S", time.localtime(ts / 1000))
    return "--:--:--"


class Terminal:
    """Standard input and output: line editing on a TTY, plain lines on a pipe.

    ``on_line(text)`` gets every entered line; ``on_eof()`` the end of input
    (Ctrl-D on an empty line). Output is written at once, blocking (a few
    lines of chat), so nothing is lost when the chat exits right after.
    """

    PROMPT = "> "

    def __init__(self, tty: bool, on_line: Any, on_eof: Any, out_fd: int = 1) -> None:
        self.tty = tty
        self.on_line = on_line
        self.on_eof = on_eof
        self.out_fd = out_fd
        self.buffer = ""
        #: shown in front of the prompt on a terminal (e.g. "bob is typing...")
        self.status = ""
        #: called on every key that changes the input line (the chat sends typing)
        self.on_typing: Any = None
        self._pending = b""
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._escape = ""

    # output

    def write(self, data: bytes) -> None:
        while data:
            try:
                n = os.write(self.out_fd, data)
            except BlockingIOError:
                continue
            except OSError:
                return  # the terminal went away
            data = data[n:]

    def style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.tty else text

    def prompt(self) -> str:
        return (self.style(self.status, "2;3") + " " if self.status else "") + self.PROMPT

    def show(self, line: str) -> None:
        """Print ``line`` above the input line (which is redrawn as it was)."""
        if self.tty:
            self.write(("\r\x1b[K" + line + "\r\n" + self.prompt() + self.buffer).encode("utf-8"))
        else:
            self.write((line + "\n").encode("utf-8"))

    def set_status(self, status: str) -> None:
        """The text in front of the prompt (a terminal only; a pipe gets ``*`` lines instead)."""
        if status != self.status:
            self.status = status
            self.redraw()

    def redraw(self) -> None:
        if self.tty:
            self.write(("\r\x1b[K" + self.prompt() + self.buffer).encode("utf-8"))

    # input

    def feed(self, data: bytes) -> None:
        """Bytes read from standard input."""
        if not self.tty:
            self._pending += data
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                self.on_line(line.rstrip(b"\r").decode("utf-8", "replace"))
            return
        for ch in self._decoder.decode(data):
            self._key(ch)

    def end_of_input(self) -> None:
        if self._pending.strip():
            self.on_line(self._pending.decode("utf-8", "replace"))
        self._pending = b""
        self.on_eof()

    def _key(self, ch: str) -> None:
        if self._escape:
            # swallow escape sequences (arrows, function keys): ESC [ ... final byte
            self._escape += ch
            if len(self._escape) == 2 and ch not in "[O":
                self._escape = ""
            elif len(self._escape) > 2 and ("@" <= ch <= "~"):
                self._escape = ""
            return
        if ch == "\x1b":
            self._escape = ch
        elif ch in "\r\n":
            line, self.buffer = self.buffer, ""
            self.redraw()
            self.on_line(line)
        elif ch in "\x7f\x08":
            self.buffer = self.buffer[:-1]
            self.redraw()
        elif ch == "\x15":  # Ctrl-U
            self.buffer = ""
            self.redraw()
        elif ch == "\x17":  # Ctrl-W
            self.buffer = self.buffer.rstrip()
            self.buffer = self.buffer[:self.buffer.rfind(" ") + 1] if " " in self.buffer else ""
            self.redraw()
        elif ch == "\x04":  # Ctrl-D
            if not self.buffer:
                self.on_eof()
        elif ch == "\x0c":  # Ctrl-L
            self.write(b"\x1b[2J\x1b[H")
            self.redraw()
        elif ch >= " ":
            self.buffer += ch
            self.write(ch.encode("utf-8"))
            if self.on_typing is not None and not self.buffer.startswith("/"):
                self.on_typing()


@implementer(IReadDescriptor)
class StdinReader:
    """Feeds what arrives on a file descriptor (standard input) to a :class:`Terminal`.

    A plain reader on the reactor: unlike ``twisted.internet.stdio`` it
    leaves the descriptors blocking, as the shell that shares them expects.
    """

    def __init__(self, terminal: Terminal, fd: int = 0) -> None:
        self.terminal = terminal
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802 (Twisted API)
        return "stdin"

    def doRead(self) -> Any:  # noqa: N802 (Twisted API)
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError as e:
            return e
        if not data:
            return main.CONNECTION_DONE
        self.terminal.feed(data)
        return None

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted API)
        self.terminal.end_of_input()


class ChatApp:
    """The chat: one :class:`Client`, one joined session, a :class:`Terminal`."""

    log = Logger()

    def __init__(self, args: argparse.Namespace, reactor: Any, terminal: Terminal | None = None) -> None:
        self.args = args
        self.reactor = reactor
        self.exit_code = EXIT_OK
        self.session: str | None = None
        self.pending_target = args.session
        self.pending_peer = args.to
        self.oldest_seq: int | None = None
        self.members: list[str] = []
        self.receipts: dict[tuple[str, str], int] = {}  # (session, user) -> seq
        self.last_seq: dict[str, int] = {}
        # (session, seq) on screen: history and the sync may bring the same message
        self.shown: set[tuple[str, int]] = set()
        self.input_done = False
        self.stopping = False
        self._sends: set[defer.Deferred] = set()
        # msgId -> seq, and my own messages per session: seq -> msgId (for /recall, /edit, receipts)
        self.seq_of: dict[str, int] = {}
        self.mine: dict[str, dict[int, str]] = {}
        self.delivered: set[str] = set()
        # live messages of the session being joined, held until its history is on screen (so
        # that everything shows in seq order); None when not joining
        self.joining: list[dict] | None = None
        # who is typing in the open session: user -> until (reactor seconds)
        self.typing_until: dict[str, float] = {}
        self._typing_call: Any = None
        self.peers: list[str] = []  # whose presence is followed (the open session's others)
        token, get_token = _token_source(args)
        self.token = token
        trust = args.ca
        self.client = _core().Client(args.url, token, get_token=get_token, device=args.device, reactor=reactor,
                                     on_message=self.on_message, on_read_receipt=self.on_read_receipt,
                                     on_state=self.on_state, tls_trust=trust, on_typing=self.on_typing,
                                     on_presence=self.on_presence,
                                     on_delivery_receipt=self.on_delivery_receipt)
        self.terminal = terminal or Terminal(sys.stdin.isatty(), self.on_line, self.on_eof)
        self.terminal.on_typing = self.typing

    @property
    def me(self) -> str | None:
        return self.client.user_id

    def say(self, text: str) -> None:
        """A status line (``*``)."""
        self.terminal.show(self.terminal.style("* " + text, "2"))

    # --- life cycle

    def start(self) -> None:
        self.say(f"connecting to {', '.join(self.args.url)} ...")
        self.client.start().addCallbacks(self.ready, self.fatal)

    def ready(self, reply: dict) -> None:
        if self.pending_target or self.pending_peer:
            target = self.pending_target or _core().p2p_session_id(self.me, self.pending_peer)
            self.pending_target = self.pending_peer = None
            self.join(target)
        else:
            self.say("no session open: /to USER for a 1:1 chat, /join SESSION, /new USER... for a group")

    def fatal(self, failure: Any) -> None:
        if failure.check(_core().AuthFailed):
            self.terminal.show(self.terminal.style(f"! {failure.value}", "31"))
        elif not failure.check(defer.CancelledError):
            self.terminal.show(f"! {failure.getErrorMessage()}")
        self.exit_code = EXIT_FAILURE
        self.quit()

    def quit(self) -> None:
        if not self.stopping:
            self.stopping = True
            if self.reactor.running:
                self.reactor.stop()

    def shutdown(self) -> defer.Deferred:
        """Before the reactor stops: close the connection (a clean WebSocket close)."""
        self.stopping = True
        return self.client.stop().addTimeout(3, self.reactor).addErrback(lambda f: None)

    # --- the client's callbacks

    def on_state(self, state: str) -> None:
        if state == _core().READY:
            self.say(f"connected as {self.me} to {self.client.url}")
        elif state == "waiting" and self.client.connections:
            self.say("connection lost; reconnecting ...")

    def on_message(self, frame: dict) -> None:
        session = frame.get("sessionId")
        seq = frame.get("seq")
        if session == self.session:
            if self.joining is not None:
                self.joining.append(frame)  # shown with the history, in seq order
                return
            self.show_entry(frame)
            if isinstance(seq, int):
                self.last_seq[session] = max(seq, self.last_seq.get(session, 0))
                if frame.get("from") != self.me and not _core().is_event(frame):
                    self.client.read(session, seq)  # it is on screen: read
        else:
            tag = self.terminal.style(f"[{session}]", "33")
            if _core().is_event(frame):
                self.terminal.show(self.terminal.style(f"{tag} * {describe_event(frame, self.seq_of)}", "2"))
            else:
                self.terminal.show(f"{tag} {_clock(frame.get('ts'))} {frame.get('from')}: "
                                   f"{describe_body(frame.get('body'))}")

    def on_typing(self, frame: dict) -> None:
        user = frame.get("userId")
        if frame.get("sessionId") != self.session or not isinstance(user, str) or user == self.me:
            return
        now = self.reactor.seconds()
        if self.typing_until.get(user, 0) < now and not self.terminal.tty:
            self.say(f"{user} is typing...")
        self.typing_until[user] = now + 4.0  # senders repeat it every second while typing
        self.show_typing()

    def show_typing(self) -> None:
        now = self.reactor.seconds()
        self.typing_until = {u: t for u, t in self.typing_until.items() if t > now}
        users = sorted(self.typing_until)
        if not users:
            self.terminal.set_status("")
        else:
            self.terminal.set_status(f"{', '.join(users)} {'is' if len(users) == 1 else 'are'} typing...")
        if self._typing_call is not None and self._typing_call.active():
            self._typing_call.cancel()
        self._typing_call = None
        if users:
            self._typing_call = self.reactor.callLater(min(self.typing_until.values()) - now + 0.05,
                                                       self.show_typing)

    def typing(self) -> None:
        """A key typed in the input line: tell the others (the client sends at most one a second)."""
        if self.session is not None:
            self.client.typing(self.session)

    def on_presence(self, frame: dict) -> None:
        user = frame.get("userId")
        if user in self.peers:
            self.say(f"{user} is {'online' if frame.get('online') else 'offline'}")

    def on_delivery_receipt(self, frame: dict) -> None:
        ids = [i for i in frame.get("msgIds") or [] if isinstance(i, str)]
        self.delivered.update(ids)
        if frame.get("sessionId") != self.session:
            return
        # what the user already read needs no "delivered" line (receipts may come in either order)
        read = self.receipts.get((self.session, frame.get("userId")), 0)
        seqs = sorted(self.seq_of[i] for i in ids if i in self.seq_of and self.seq_of[i] > read)
        if seqs:
            self.say(f"✓ delivered to {frame.get('userId')}: " + ", ".join(f"#{n}" for n in seqs))

    def on_read_receipt(self, frame: dict) -> None:
        session, user, seq = frame.get("sessionId"), frame.get("userId"), frame.get("seq")
        if session != self.session or not isinstance(seq, int):
            return
        key = (session, user)
        if self.receipts.get(key, -1) >= seq:
            return
        self.receipts[key] = seq
        if user == self.me:
            return  # another device of mine read it
        self.say(f"✓✓ {user} read up to #{seq}")

    # --- showing

    def show_entry(self, m: dict) -> None:
        """One entry of the open session: a message, or an event (a ``*`` line, never as text)."""
        if not _core().is_event(m):
            self.show_message(m)
            return
        seq = m.get("seq")
        if isinstance(seq, int):
            if (self.session, seq) in self.shown:
                return
            self.shown.add((self.session, seq))
            if self.oldest_seq is None or seq < self.oldest_seq:
                self.oldest_seq = seq
        if m.get("kind") == "members" and isinstance(m.get("body"), dict):
            body = m["body"]
            members = [u for u in self.members if u not in (body.get("removed") or [])]
            members += [u for u in body.get("added") or [] if isinstance(u, str) and u not in members]
            self.members = members
            if self.me in (body.get("removed") or []):
                self.say(f"{m.get('from')} removed you from {self.session}")
                return
            self.follow_presence()
        self.typing_until.pop(str(m.get("from")), None)
        self.say(f"#{seq} {describe_event(m, self.seq_of)}")

    def show_message(self, m: dict) -> None:
        """One message of the open session (history, live, or one of mine just stored)."""
        seq = m.get("seq")
        if isinstance(seq, int):
            if (self.session, seq) in self.shown:
                return
            self.shown.add((self.session, seq))
            if isinstance(m.get("msgId"), str):
                self.seq_of[m["msgId"]] = seq
        if isinstance(seq, int) and (self.oldest_seq is None or seq < self.oldest_seq):
            self.oldest_seq = seq  # /history pages back from the oldest message on screen
        sender = m.get("from")
        if sender in self.typing_until:
            self.typing_until.pop(sender)
            self.show_typing()
        name = self.terminal.style(str(sender), "1;36" if sender == self.me else "1")
        mark = ""
        if sender == self.me:
            if isinstance(seq, int) and isinstance(m.get("msgId"), str):
                self.mine.setdefault(str(self.session), {})[seq] = m["msgId"]
            mark = " ✓"
            if any(seq >= m.get("seq", 0) for (s, u), seq in self.receipts.items()
                   if s == self.session and u != self.me):
                mark = " ✓✓"
            elif m.get("delivered") is True or m.get("msgId") in self.delivered:
                mark = " ✓ delivered"
        if m.get("recalled"):
            text = self.terminal.style("(recalled)", "2;3")
        else:
            text = describe_body(m.get("body"))
            if m.get("edited"):
                text += self.terminal.style(" (edited)", "2")
        self.terminal.show(f"{_clock(m.get('ts'))} #{m.get('seq')} {name}: {text}{mark}")

    # --- joining

    def join(self, session: str, members: list[str] | None = None) -> None:
        self.session = session
        self.oldest_seq = None
        self.shown = {k for k in self.shown if k[0] != session}
        self.typing_until = {}
        self.show_typing()
        self.members = list(members) if members else (session.split(":")[1:] if session.startswith("p2p:") else [])
        self.say(f"joined {session}")
        self.joining = [] if self.args.history > 0 else None
        self.load_history(self.args.history, first=True)
        if self.args.api:
            self.who()
        if self.members:
            self.follow_presence()
        elif self.args.api:
            self.api_get(f"/v1/sessions/{quote(session, safe='')}").addCallbacks(
                lambda v: self._got_members(session, v.get("members") or []), lambda f: None)

    def _got_members(self, session: str, members: list[str]) -> None:
        if session == self.session:
            self.members = [u for u in members if isinstance(u, str)]
            self.follow_presence()

    def follow_presence(self) -> None:
        """Live presence of the open session's other members (a version 1 server refuses it: quiet)."""
        peers = [u for u in self.members if u != self.me]
        gone = [u for u in self.peers if u not in peers]
        if gone:
            self.client.unsubscribe_presence(gone)
        new = [u for u in peers if u not in self.peers]
        self.peers = peers
        if new:
            self.client.subscribe_presence(new).addErrback(lambda f: None)

    def _end_join(self, session: str) -> None:
        """History is on screen: the live messages held meanwhile, in seq order."""
        if session != self.session or self.joining is None:
            return
        held, self.joining = self.joining, None
        held.sort(key=lambda f: f.get("seq") if isinstance(f.get("seq"), int) else 0)
        for frame in held:
            self.on_message(frame)

    def load_history(self, n: int, first: bool = False) -> None:
        session = self.session
        if session is None or n <= 0:
            return
        if not first and self.oldest_seq is None:
            first = True  # nothing on screen yet: the newest page
        d = self.client.history(session, before_seq=None if first else self.oldest_seq, limit=min(n, 200))

        def shown(messages: list[dict]) -> None:
            if session != self.session:
                return
            if not messages:
                if not (first and self.joining):
                    self.say("no earlier messages" if not first else "no messages yet")
                if first:
                    self._end_join(session)
                return
            if not first:
                self.say(f"{len(messages)} earlier messages:")
            for m in messages:
                if isinstance(m.get("msgId"), str) and isinstance(m.get("seq"), int):
                    self.seq_of[m["msgId"]] = m["seq"]
            for m in messages:
                self.show_entry(m)
            if first:
                last = messages[-1]["seq"]
                self.last_seq[session] = max(last, self.last_seq.get(session, 0))
                self.client.read(session, last)
                self._end_join(session)

        def failed(f: Any) -> None:
            if session != self.session:
                return
            if f.check(_core().ClientError) and f.value.code == "no_session":
                self.say(f"{session} does not exist yet" if not session.startswith("p2p:")
                         else "no messages yet")
            else:
                self.say(f"history failed: {f.getErrorMessage()}")
            if first:
                self._end_join(session)

        d.addCallbacks(shown, failed)

    # --- HTTP API (presence, sessions)

    def api_get(self, path: str) -> defer.Deferred:
        from twisted.web.client import Agent, readBody
        from twisted.web.http_headers import Headers

        agent = Agent(self.reactor)
        token = self.client.current_token or ""
        d = agent.request(b"GET", (self.args.api.rstrip("/") + path).encode("utf-8"),
                          Headers({b"authorization": [f"Bearer {token}".encode("utf-8")]}))

        def body(response: Any) -> defer.Deferred:
            def parse(data: bytes) -> Any:
                value = json.loads(data.decode("utf-8")) if data else {}
                if response.code >= 400:
                    raise _core().ClientError(str(value.get("error", {}).get("code") or response.code),
                                      str(value.get("error", {}).get("message") or ""))
                return value
            return readBody(response).addCallback(parse)

        return d.addCallback(body).addTimeout(10, self.reactor)

    def who(self) -> None:
        if not self.args.api:
            known = {u: self.client.presence[u] for u in self.peers if u in self.client.presence}
            if not known:
                self.say("/who needs --api URL (imapi), or a server with live presence")
                return
            online = [u for u, p in known.items() if p.get("online")]
            offline = [u for u, p in known.items() if not p.get("online")]
            parts = (["online: " + ", ".join(online)] if online else []) + (
                ["offline: " + ", ".join(offline)] if offline else [])
            self.say("; ".join(parts))
            return
        session = self.session
        if session is None:
            self.say("join a session first")
            return

        async def presence() -> None:
            if session.startswith("p2p:"):
                members = session.split(":")[1:]
            else:
                members = (await self.api_get(f"/v1/sessions/{quote(session, safe='')}"))["members"]
            online, offline = [], []
            for user in members:
                if user == self.me:
                    continue
                p = await self.api_get(f"/v1/users/{quote(user, safe='')}/presence")
                (online if p.get("online") else offline).append(user)
            parts = []
            if online:
                parts.append("online: " + ", ".join(online))
            if offline:
                parts.append("offline: " + ", ".join(offline))
            self.say("; ".join(parts) or "nobody else here")

        defer.Deferred.fromCoroutine(presence()).addErrback(
            lambda f: self.say(f"presence failed: {f.getErrorMessage()}"))

    def sessions(self) -> None:
        if not self.args.api:
            self.say("/sessions needs --api URL (imapi)")
            return

        def shown(value: dict) -> None:
            rows = value.get("sessions") or []
            if not rows:
                self.say("no sessions yet")
            for s in rows:
                unread = f" ({s['unread']} unread)" if s.get("unread") else ""
                self.say(f"{s['sessionId']}{unread}")

        self.api_get(f"/v1/users/{quote(self.me or '', safe='')}/sessions").addCallbacks(
            shown, lambda f: self.say(f"sessions failed: {f.getErrorMessage()}"))

    # --- input

    HELP = ("/to USER  /join SESSION  /new USER...  /history [N]  /recall [#N]  /edit [#N] TEXT  /who  "
            "/sessions  /quit   (anything else is sent to the open session)")

    def on_line(self, line: str) -> None:
        text = line.strip()
        if not text:
            return
        if text.startswith("/"):
            self.command(text)
            return
        if self.session is None:
            self.say("no session open: /to USER or /join SESSION first")
            return
        self.send(self.session, text)

    def command(self, text: str) -> None:
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        if name in ("/quit", "/exit"):
            self.quit()
        elif name == "/help":
            self.say(self.HELP)
        elif name == "/to" and rest:
            self.when_ready(lambda: self.join(_core().p2p_session_id(self.me, rest)))
        elif name == "/join" and rest:
            self.join(rest)
        elif name == "/new" and rest:
            d = self.client.create_session(rest.split())
            d.addCallbacks(lambda r: self.join(r["sessionId"], r.get("members")),
                           lambda f: self.say(f"cannot create the group: {f.getErrorMessage()}"))
        elif name == "/history":
            self.load_history(int(rest) if rest.isdigit() else HISTORY_DEFAULT)
        elif name == "/recall":
            self.change("recall", rest)
        elif name == "/edit" and rest:
            self.change("edit", rest)
        elif name == "/who":
            self.who()
        elif name == "/sessions":
            self.sessions()
        else:
            self.say(f"unknown command {name}; " + self.HELP)

    def change(self, kind: str, rest: str) -> None:
        """``/recall [#N]``, ``/edit [#N] TEXT``: one of my messages of the open session (the last one
        when no #N is given)."""
        session = self.session
        if session is None:
            self.say("join a session first")
            return
        mine = self.mine.get(session, {})
        first, _, text = rest.partition(" ")
        number = first.lstrip("#")
        if number.isdigit() and (first.startswith("#") or kind == "recall"):
            seq = int(number)
        else:
            seq, text = (max(mine) if mine else None), rest
        if kind == "edit" and not text.strip():
            self.say("/edit [#N] TEXT")
            return
        msg_id = mine.get(seq) if seq is not None else None
        if msg_id is None:
            self.say(f"no message of yours {'#' + str(seq) if seq is not None else ''} here to {kind}".replace("  ", " "))
            return
        body = {"text": text.strip()}
        d = self.client.recall(msg_id) if kind == "recall" else self.client.edit(msg_id, body)

        def done(reply: dict) -> None:
            event = {"kind": kind, "ref": msg_id, "from": self.me, "seq": reply.get("seq"), "body": body}
            if session == self.session:
                self.show_entry(event)

        def failed(f: Any) -> None:
            why = f.value.code if f.check(_core().ClientError) else f.getErrorMessage()
            self.terminal.show(self.terminal.style(f"✗ cannot {kind} #{seq} ({why})", "31"))

        d.addCallbacks(done, failed)

    def when_ready(self, then: Any) -> None:
        if self.me is None:
            self.client.when_ready().addCallback(lambda _: then())
        else:
            then()

    def send(self, session: str, text: str) -> None:
        d = self.client.send(session, {"text": text})
        self._sends.add(d)

        def stored(reply: dict) -> None:
            if session == self.session:
                self.show_message({"from": self.me, "seq": reply.get("seq"), "ts": reply.get("ts"),
                                   "msgId": reply.get("msgId"), "body": {"text": text}})
                self.last_seq[session] = max(reply.get("seq", 0), self.last_seq.get(session, 0))

        def failed(f: Any) -> None:
            shown = text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
            if f.check(_core().SendError):
                why = f.value.code + (f": {f.value.message}" if f.value.code == "too_large" else "")
                self.terminal.show(self.terminal.style(f"✗ not sent ({why}): {shown}", "31"))
            elif not self.stopping:
                self.terminal.show(self.terminal.style(f"✗ not sent ({f.getErrorMessage()}): {shown}", "31"))

        def done(result: Any) -> Any:
            self._sends.discard(d)
            if self.input_done and not self._sends:
                self.quit()
            return result

        d.addCallbacks(stored, failed)
        d.addBoth(done)

    def on_eof(self) -> None:
        if self.input_done:
            return
        self.input_done = True
        if not self._sends:
            self.quit()


def run(args: argparse.Namespace) -> int:
    """``imcluster chat``: run until Ctrl-C, /quit or end of input; the exit status."""
    from twisted.internet import reactor

    if args.verbose:
        from twisted.logger import globalLogBeginner, textFileLogObserver
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    try:
        app = ChatApp(args, reactor)
    except ValueError as e:
        print(f"imcluster chat: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if args.token and _core().token_expiry(app.client.current_token or "") is None:
        print("imcluster chat: warning: the token is not a JWT with 'exp'", file=sys.stderr)

    saved = None
    fd = sys.stdin.fileno()
    if app.terminal.tty:
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)  # keys one by one, no echo; Ctrl-C still sends SIGINT

    def restore() -> None:
        if saved is not None:
            import termios
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    try:
        app.terminal.redraw()
        reactor.addReader(StdinReader(app.terminal, fd))
        reactor.addSystemEventTrigger("before", "shutdown", app.shutdown)
        reactor.callWhenRunning(app.start)
        reactor.run()
    finally:
        restore()
    if app.terminal.tty:
        sys.stdout.write("\r\x1b[K")
    sys.stdout.write("bye\n")
    sys.stdout.flush()
    return app.exit_code
