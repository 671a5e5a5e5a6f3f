"""``imcluster chat`` as a user runs it: a real process, on a pipe and on a terminal (pty)."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task

from imcluster.client import Client, p2p_session_id
from imcluster.client.testing import FakeServer
from imcluster.protocol import CLIENT_TYPES

# starts processes: not part of the fast suite (-m "not slow")
pytestmark = pytest.mark.slow

IMCLUSTER = str(Path(sys.executable).parent / "imcluster")
WAIT = 20.0
SESSION = p2p_session_id("alice", "bob")


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def within(d: defer.Deferred, seconds: float = WAIT) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


class ChatProcess(protocol.ProcessProtocol):
    """``imcluster chat`` in a child process; collects its output."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.exit_code: int | None = None

    @classmethod
    def spawn(cls, args: list[str], pty: bool = False) -> "ChatProcess":
        proc = cls()
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMCLUSTER_")}
        env.update(TERM="xterm", LANG="C.UTF-8", PYTHONUNBUFFERED="1")
        reactor.spawnProcess(proc, IMCLUSTER, [IMCLUSTER, "chat", *args], env=env, usePTY=pty)
        return proc

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:  # noqa: N802
        self.exit_code = reason.value.exitCode
        self.ended.callback(self.exit_code)

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def type(self, text: str) -> None:
        self.transport.write(text.encode("utf-8"))

    async def wait_for(self, pattern: str, timeout: float = WAIT) -> re.Match:
        deadline = reactor.seconds() + timeout
        while True:
            found = re.search(pattern, self.text)
            if found:
                return found
            if reactor.seconds() > deadline or self.ended.called:
                raise AssertionError(f"{pattern!r} not in the chat's output:\n{self.text}")
            await sleep(0.02)

    def kill(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess("KILL")


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_chat_on_a_pipe_with_real_cluster(cluster):
    """A user of the terminal chat would miss history, live messages, receipts or presence."""
    gw, _, api = await defer.gatherResults(
        [cluster.start_gateway(), cluster.start_processor(), cluster.start_api()])
    receipts, bob_inbox = [], []
    bob = Client(gw.ws_url, cluster.token("bob"), on_read_receipt=receipts.append, on_message=bob_inbox.append)
    chat = None
    try:
        await within(bob.start())
        first = await within(bob.send(SESSION, {"text": "hello alice"}))
        chat = ChatProcess.spawn(["--url", f"tcp://127.0.0.1:{gw.tcp_port}", "--url", gw.ws_url,
                                  "--token", cluster.token("alice"), "--to", "bob",
                                  "--api", f"http://127.0.0.1:{api.http_port}"])
        await chat.wait_for(r"connected as alice to tcp://")
        await chat.wait_for(r"#1 bob: hello alice")
        await chat.wait_for(r"online: bob")
        # history on screen counts as read
        while not receipts:
            await sleep(0.02)
        assert receipts[0]["userId"] == "alice" and receipts[0]["seq"] == first["seq"]

        live = await within(bob.send(SESSION, {"text": "are you there?"}))
        await chat.wait_for(r"#2 bob: are you there\?")
        chat.type("yes, über-here\n")
        await chat.wait_for(r"#3 alice: yes, über-here ✓")
        while not bob_inbox:
            await sleep(0.02)
        assert bob_inbox[0]["body"] == {"text": "yes, über-here"} and bob_inbox[0]["from"] == "alice"
        assert receipts[-1]["seq"] == live["seq"]
        bob.read(SESSION, 3)
        await chat.wait_for(r"✓✓ bob read up to #3")
        chat.type("/history 1\n")
        await chat.wait_for(r"\* no earlier messages")
        chat.type("/nonsense\n")
        await chat.wait_for(r"unknown command /nonsense")
        chat.type("last words\n")
        chat.transport.closeStdin()  # end of input: leaves once "last words" is stored
        assert await within(chat.ended) == 0
        assert re.search(r"#4 alice: last words ✓\n.*bye", chat.text, re.S)
        assert [m["body"]["text"] for m in await within(bob.history(SESSION))][-1] == "last words"
    finally:
        if chat is not None:
            chat.kill()
        await within(bob.stop())


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    pytest_twisted.blockon(defer.ensureDeferred(s.stop()))


@pytest_twisted.ensureDeferred
async def test_chat_on_a_terminal_keeps_the_typed_line_and_exits_on_ctrl_c(server):
    """Incoming messages would garble a half-typed line, and Ctrl-C would leave a broken terminal."""
    port = await server.listen("ws")
    url = f"ws://127.0.0.1:{port}/ws"
    bob = Client(url, server.token("bob"))
    chat = ChatProcess.spawn(["--url", url, "--user", "alice", "--secret", server.secret, "--to", "bob"], pty=True)
    try:
        await within(bob.start())
        await chat.wait_for(r"joined p2p:alice:bob")
        await chat.wait_for(r"no messages yet")
        chat.type("half a line")
        await chat.wait_for(r"half a line")
        await within(bob.send(SESSION, {"text": "interrupting"}))
        # the message is printed above the input line, which is drawn again as typed
        await chat.wait_for(r"\r\x1b\[K[^\r]*#1 \x1b\[1mbob\x1b\[0m: interrupting\r+\n> half a line")
        chat.type("\x7f\x7f\x7f\x7fLINE\x1b[D\r")  # backspaces, an arrow key (ignored), Enter
        await chat.wait_for(r"#2 \x1b\[1;36malice\x1b\[0m: half a LINE")
        chat.type("\x03")  # Ctrl-C through the terminal: SIGINT
        assert await within(chat.ended, 10) == 0
        assert chat.text.rstrip().endswith("bye")
        page = await within(bob.history(SESSION))
        assert [m["body"]["text"] for m in page] == ["interrupting", "half a LINE"]
    finally:
        chat.kill()
        await within(bob.stop())


@pytest_twisted.ensureDeferred
async def test_chat_refused_token_exits_with_failure(server):
    """A wrong secret would leave the chat retrying silently instead of saying why."""
    port = await server.listen("tcp")
    chat = ChatProcess.spawn(["--url", f"tcp://127.0.0.1:{port}", "--user", "alice", "--secret", "wrong",
                              "--to", "bob"])
    try:
        assert await within(chat.ended) == 1
        assert "refused the token" in chat.text
    finally:
        chat.kill()


@pytest_twisted.ensureDeferred
async def test_chat_rejoining_shows_the_synced_message_after_the_history(server):
    """Rejoining a 1:1 after being offline printed the synced message before the history (#3, then
    #1, #2): the open session's live messages wait for its history and show in seq order."""
    port = await server.listen("ws")
    url = f"ws://127.0.0.1:{port}/ws"
    bob = Client(url, server.token("bob"))
    seen = []
    alice = Client(url, server.token("alice"), on_message=seen.append)
    chat = None
    try:
        await within(defer.gatherResults([bob.start(), alice.start()]))
        await within(bob.send(SESSION, {"text": "one"}))
        await within(bob.send(SESSION, {"text": "two"}))
        while len(seen) < 2:
            await sleep(0.02)
        await within(alice.stop())  # #1 and #2 acknowledged: alice goes offline
        await within(bob.send(SESSION, {"text": "three"}))
        chat = ChatProcess.spawn(["--url", url, "--token", server.token("alice"), "--to", "bob"])
        await chat.wait_for(r"#3 bob: three")
        await sleep(0.3)
        order = [int(n) for n in re.findall(r"#(\d) bob:", chat.text)]
        assert order == [1, 2, 3], chat.text
        chat.type("/recall\n")
        await chat.wait_for(r"no message of yours")
        chat.type("x" * 70_000 + "\n")
        await chat.wait_for(r"✗ not sent \(too_large: the message is \d+ bytes; the limit is 65536\): x{60}\.\.\. "
                            r"\(70000 characters\)")
        chat.type("after the big one\n")
        await chat.wait_for(r"#4 alice: after the big one ✓")
    finally:
        if chat is not None:
            chat.kill()
        await within(bob.stop())


#: typing and live presence (PROTOCOL.md 1.1) are in the tree: their steps run
LIVE = {"typing", "presence_subscribe"} <= CLIENT_TYPES


@pytest.mark.skipif("recall" not in CLIENT_TYPES, reason="the server side of PROTOCOL.md 1.1 is not in this tree yet")
@pytest_twisted.ensureDeferred
async def test_chat_version_1_1_with_real_cluster(cluster):
    """A terminal chat user would not see typing, presence, delivered, recall, edit or membership
    changes, nor be able to recall or edit his own messages."""
    gw1, gw2, _ = await defer.gatherResults(
        [cluster.start_gateway(), cluster.start_gateway(), cluster.start_processor()])
    bob_in = []
    bob = Client(gw2.ws_url, cluster.token("bob"), on_message=bob_in.append)
    chat = ChatProcess.spawn(["--url", f"tcp://127.0.0.1:{gw1.tcp_port}", "--token", cluster.token("alice"),
                              "--to", "bob"])
    try:
        await chat.wait_for(r"joined p2p:alice:bob")
        if LIVE:
            await chat.wait_for(r"\* bob is offline")
        await within(bob.start())
        if LIVE:
            await chat.wait_for(r"\* bob is online")
        chat.type("lunch at 12?\n")
        await chat.wait_for(r"#1 alice: lunch at 12\? ✓")
        await chat.wait_for(r"✓ delivered to bob: #1")
        if LIVE:
            bob.typing(SESSION)
            await chat.wait_for(r"\* bob is typing\.\.\.")
        reply = await within(bob.send(SESSION, {"text": "yes, at the usual place"}))
        await chat.wait_for(r"#2 bob: yes, at the usual place")
        await within(bob.edit(reply["msgId"], {"text": "yes, at the new place"}))
        await chat.wait_for(r"\* #3 bob edited #2: yes, at the new place")
        chat.type("/edit lunch at 12:30?\n")
        await chat.wait_for(r"\* #4 alice edited #1: lunch at 12:30\?")
        chat.type("wrong window\n")
        await chat.wait_for(r"#5 alice: wrong window ✓")
        chat.type("/recall\n")
        await chat.wait_for(r"\* #6 alice recalled #5")
        chat.type("/recall #2\n")
        await chat.wait_for(r"no message of yours #2 here to recall")
        while len(bob_in) < 4:
            await sleep(0.02)
        assert [(f.get("kind"), f["seq"]) for f in bob_in] == [(None, 1), ("edit", 4), (None, 5), ("recall", 6)]
        page = {m["seq"]: m for m in await within(bob.history(SESSION))}
        assert page[1]["body"] == {"text": "lunch at 12:30?"} and page[1]["edited"] is True
        assert page[5]["recalled"] is True
        await within(bob.stop())
        if LIVE:
            await chat.wait_for(r"\* bob is offline(?s:.*)\* bob is offline")
        chat.transport.closeStdin()
        assert await within(chat.ended) == 0
        # events never show as message lines
        assert "null" not in chat.text and "kind" not in chat.text
    finally:
        chat.kill()
        await within(bob.stop())
