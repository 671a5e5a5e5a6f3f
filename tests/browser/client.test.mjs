// imcluster.js rules on a fake WebSocket (node --test): the same guarantees as the Python client.
import test from "node:test";
import assert from "node:assert/strict";

import { IMClient, IMError, p2pSessionId, tokenExpiry } from "../../imcluster/static/imcluster.js";

const SESSION = p2pSessionId("bob", "alice");

class FakeWS {
  static all = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeWS.all.push(this);
  }

  send(data) { this.sent.push(JSON.parse(data)); }

  close(code = 1000) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose && this.onclose({ code, reason: "" }));
  }

  // the test plays the gateway
  open() { this.readyState = 1; this.onopen && this.onopen(); }
  recv(frame) { this.onmessage && this.onmessage({ data: JSON.stringify(frame) }); }
  drop(code = 1006) { this.readyState = 3; this.onclose && this.onclose({ code, reason: "gone" }); }
  ofType(type) { return this.sent.filter((f) => f.type === type); }
  authOk(user = "alice") { this.recv({ type: "auth_reply", ok: true, userId: user, connId: "c", serverId: "gw" }); }
  replyOk(frame, seq) {
    this.recv({ type: "message_reply", ok: true, clientMsgId: frame.clientMsgId, msgId: `m${seq}`,
      sessionId: frame.sessionId, seq, ts: 1 });
  }
}

async function until(check, what = "condition", ms = 2000) {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`${what} not reached`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

function make(options = {}) {
  FakeWS.all = [];
  return new IMClient({
    urls: ["ws://gw1.test/ws", "ws://gw2.test/ws"], token: "t", WebSocket: FakeWS,
    retryInitial: 0.01, retryMax: 0.05, pingInterval: 0, ...options,
  });
}

async function connected(client, n) {
  await until(() => FakeWS.all.length >= n, `connection ${n}`);
  const ws = FakeWS.all[n - 1];
  ws.open();
  ws.authOk();
  return ws;
}

test("unanswered messages are resent in order with the same clientMsgId on the next gateway", async () => {
  const client = make();
  const started = client.start();
  const ws = await connected(client, 1);
  assert.deepEqual(ws.sent[0], { type: "auth", token: "t" });
  assert.equal((await started).userId, "alice");
  const sends = [0, 1, 2].map((i) => client.send(SESSION, { n: i }));
  const first = ws.ofType("message");
  ws.replyOk(first[0], 1);
  ws.drop();
  const ws2 = await connected(client, 2);
  assert.equal(ws2.url, "ws://gw2.test/ws");
  const again = ws2.ofType("message");
  assert.deepEqual(again.map((f) => f.clientMsgId), first.slice(1).map((f) => f.clientMsgId));
  again.forEach((f, i) => ws2.replyOk(f, i + 2));
  assert.deepEqual((await Promise.all(sends)).map((r) => r.seq), [1, 2, 3]);
  await client.stop();
});

test("a refused message rejects with the server's code; unavailable is retried", async () => {
  const client = make();
  client.start();
  const ws = await connected(client, 1);
  const refused = client.send("nope", 1, { clientMsgId: "c1" });
  const later = client.send(SESSION, 2, { clientMsgId: "c2" });
  ws.recv({ type: "message_reply", ok: false, clientMsgId: "c1", error: { code: "not_member", message: "no" } });
  ws.recv({ type: "message_reply", ok: false, clientMsgId: "c2", error: { code: "unavailable", message: "later" } });
  await assert.rejects(refused, (e) => e instanceof IMError && e.code === "not_member");
  await until(() => ws.ofType("message").length === 3, "the retry");
  ws.replyOk(ws.ofType("message")[2], 5);
  assert.equal((await later).seq, 5);
  await client.stop();
});

test("messages are handled once each, acknowledged after the handler, sync merged in seq order", async () => {
  const handled = [];
  let release;
  const gate = new Promise((r) => { release = r; });
  const client = make({
    onMessage: (m) => { handled.push(m.seq); return m.seq === 7 ? gate : undefined; },
  });
  client.start();
  const ws = await connected(client, 1);
  const msg = (id, seq) => ({ type: "message_send", msgId: id, sessionId: SESSION, seq, from: "bob", body: {} });
  ws.recv(msg("9", 9));
  ws.recv(msg("7", 7));
  ws.recv(msg("8", 8));
  assert.deepEqual(handled, []);
  ws.recv({ type: "sync_done", count: 2 });
  assert.deepEqual(handled, [7], "the handler of 7 holds the others");
  await new Promise((r) => setTimeout(r, 5));
  assert.deepEqual(ws.ofType("message_send_reply"), []);
  release();
  await until(() => handled.length === 3, "all handled");
  ws.recv(msg("8", 8));
  await until(() => ws.ofType("message_send_reply").flatMap((f) => f.msgIds).length === 4, "acks");
  assert.deepEqual(handled, [7, 8, 9]);
  assert.deepEqual(ws.ofType("message_send_reply").flatMap((f) => f.msgIds).sort(), ["7", "8", "8", "9"]);
  await client.stop();
});

test("a second sync_done (a server re-sync) holds nothing back and is reported again", async () => {
  const handled = [];
  const synced = [];
  const client = make({ onMessage: (m) => { handled.push(m.seq); }, onSyncDone: (n) => synced.push(n) });
  client.start();
  const ws = await connected(client, 1);
  const msg = (id, seq) => ({ type: "message_send", msgId: id, sessionId: SESSION, seq, from: "bob", body: {} });
  ws.recv({ type: "sync_done", count: 0 });
  ws.recv(msg("5", 5));
  ws.recv(msg("5", 5));
  ws.recv(msg("4", 4));
  ws.recv({ type: "sync_done", count: 2 });
  await until(() => handled.length === 2, "both handled");
  assert.deepEqual(handled, [5, 4]);
  assert.deepEqual(synced, [0, 2]);
  await client.stop();
});

test("history is matched by id and repeated after a reconnect; reads are repeated too", async () => {
  const client = make();
  client.start();
  const ws = await connected(client, 1);
  const page = client.history(SESSION, { beforeSeq: 5, limit: 2 });
  client.read(SESSION, 4);
  client.read(SESSION, 3);
  const [h] = ws.ofType("history");
  assert.equal(h.beforeSeq, 5);
  assert.deepEqual(ws.ofType("read"), [{ type: "read", sessionId: SESSION, seq: 4 }]);
  ws.drop();
  const ws2 = await connected(client, 2);
  assert.deepEqual(ws2.ofType("history"), [h]);
  assert.deepEqual(ws2.ofType("read"), [{ type: "read", sessionId: SESSION, seq: 4 }]);
  ws2.recv({ type: "history_reply", id: h.id, sessionId: SESSION, messages: [{ seq: 3 }, { seq: 4 }] });
  assert.deepEqual((await page).map((m) => m.seq), [3, 4]);
  const group = client.createSession(["bob"]);
  ws2.drop();
  await assert.rejects(group, (e) => e.code === "disconnected");
  await client.stop();
});

test("going away moves to the next gateway within goingAwaySpread, not after a backoff", async () => {
  const client = make({ retryInitial: 5, retryMax: 5, goingAwaySpread: 0.2 });
  client.start();
  const ws = await connected(client, 1);
  ws.drop(1001);
  await until(() => FakeWS.all.length === 2, "a reconnect within the spread", 500);
  assert.equal(FakeWS.all[1].url, "ws://gw2.test/ws");
  await client.stop();
});

test("clients of a gateway going away spread their reconnects over a few seconds", async () => {
  // all at delay 0, a drained gateway's clients connect and sync on the next one at once
  const delays = [];
  const realTimeout = globalThis.setTimeout;
  for (let i = 0; i < 40; i++) {
    const client = make();
    client.start();
    const ws = await connected(client, 1);
    let seen = null;
    globalThis.setTimeout = (fn, ms) => { if (seen === null) seen = ms; return realTimeout(fn, ms); };
    try { ws.drop(1001); } finally { globalThis.setTimeout = realTimeout; }
    delays.push(seen / 1000);
    await client.stop();
  }
  assert.ok(delays.every((d) => d >= 0 && d <= 3), delays.join(","));
  assert.ok(Math.max(...delays) - Math.min(...delays) > 1.5, `not spread: ${delays.join(",")}`);
  assert.ok(delays.filter((d) => d < 0.1).length < 10, `most at once: ${delays.join(",")}`);
});

// --- frame size (issue 16, rough edge 1) ---------------------------------------------------------

test("a message over the frame limit is refused before it is sent; the next one goes out", async () => {
  const client = make();
  client.start();
  const ws = await connected(client, 1);
  const big = client.send(SESSION, { text: "x".repeat(70000) });
  await assert.rejects(big, (e) => e.code === "too_large" && /65536/.test(e.message));
  const small = client.send(SESSION, { text: "next" });
  assert.deepEqual(ws.ofType("message").map((f) => f.body), [{ text: "next" }]);
  ws.replyOk(ws.ofType("message")[0], 1);
  assert.equal((await small).seq, 1);
  await assert.rejects(client.edit("m1", { text: "é".repeat(40000) }), (e) => e.code === "too_large");
  assert.deepEqual(ws.ofType("edit"), []);
  await client.stop();
});

test("a frame the gateway closed the socket for (1009) fails and is never sent again", async () => {
  const client = make();
  client.start();
  const ws = await connected(client, 1);
  const big = client.send(SESSION, { text: "x".repeat(40000) });
  const small = client.send(SESSION, { text: "small" });
  big.catch(() => {});
  ws.drop(1009);
  await assert.rejects(big, (e) => e.code === "too_large");
  const ws2 = await connected(client, 2);
  assert.deepEqual(ws2.ofType("message").map((f) => f.body), [{ text: "small" }]);
  ws2.replyOk(ws2.ofType("message")[0], 1);
  assert.equal((await small).seq, 1);
  assert.ok(client.maxFrameSize < 40200);
  await client.stop();
});

test("a frame posted over the streaming transport and refused with 413 fails, not lost", async () => {
  const gateway = new FakeStreamGateway();
  gateway.limit = 30000;
  const { client } = makeStreaming(gateway, { transports: ["poll"] });
  await client.start();
  const big = client.send(SESSION, { text: "x".repeat(40000) });
  await assert.rejects(big, (e) => e.code === "too_large");
  await client.stop();
});

// --- version 1.1 frames ---------------------------------------------------------------------------

test("recall and edit are answered by id; typing is throttled; delivery receipts reach the page", async () => {
  const typed = [], delivered = [];
  const client = make({ onTyping: (t) => typed.push(t), onDeliveryReceipt: (r) => delivered.push(r) });
  client.start();
  assert.equal(client.typing(SESSION), false, "not connected: dropped");
  const ws = await connected(client, 1);
  const recalled = client.recall("m7");
  const edited = client.edit("m8", { text: "fixed" });
  const [r] = ws.ofType("recall");
  const [e] = ws.ofType("edit");
  assert.equal(r.msgId, "m7");
  assert.deepEqual(e.body, { text: "fixed" });
  ws.recv({ type: "recall_reply", id: r.id, ok: true, msgId: "e1", sessionId: SESSION, seq: 9 });
  ws.recv({ type: "edit_reply", id: e.id, ok: false, error: { code: "not_allowed", message: "late" } });
  assert.equal((await recalled).seq, 9);
  await assert.rejects(edited, (x) => x.code === "not_allowed");
  assert.deepEqual([1, 2, 3, 4].map(() => client.typing(SESSION)), [true, false, false, false]);
  assert.equal(ws.ofType("typing").length, 1);
  ws.recv({ type: "typing", sessionId: SESSION, userId: "bob" });
  ws.recv({ type: "delivery_receipt", sessionId: SESSION, userId: "bob", msgIds: ["m1"] });
  assert.equal(typed[0].userId, "bob");
  assert.deepEqual(delivered[0].msgIds, ["m1"]);
  await client.stop();
});

test("presence subscriptions are made again after a reconnect and report what changed", async () => {
  const changes = [];
  const client = make({ onPresence: (p) => changes.push(`${p.userId}:${p.online}`) });
  client.start();
  const ws = await connected(client, 1);
  const sub = client.subscribePresence(["bob", "carol"]);
  const [f] = ws.ofType("presence_subscribe");
  ws.recv({ type: "presence_reply", id: f.id, ok: true,
    users: [{ userId: "bob", online: true, since: 1 }, { userId: "carol", online: false }] });
  assert.equal((await sub).ok, true);
  ws.recv({ type: "presence", userId: "carol", online: true, ts: 2 });
  assert.deepEqual(changes, ["bob:true", "carol:false", "carol:true"]);
  client.subscribePresence(["dave"]).catch(() => {}); // unanswered when the socket drops
  ws.drop();
  const ws2 = await connected(client, 2);
  const f2 = ws2.ofType("presence_subscribe").at(-1);
  assert.deepEqual(f2.users, ["bob", "carol", "dave"], "every subscription is made again");
  ws2.recv({ type: "presence_reply", id: f2.id, ok: true,
    users: [{ userId: "bob", online: false }, { userId: "carol", online: true }, { userId: "dave", online: false }] });
  assert.deepEqual(changes.slice(3), ["bob:false", "dave:false"]);
  assert.equal(client.presence.get("bob").online, false);
  await client.stop();
});

test("a refused static token stops the client", async () => {
  const states = [];
  const client = make({ onState: (s) => states.push(s) });
  const started = client.start();
  const pending = client.send(SESSION, 1);
  await until(() => FakeWS.all.length === 1, "a connection");
  const ws = FakeWS.all[0];
  ws.open();
  ws.recv({ type: "auth_reply", ok: false, error: { code: "invalid_token", message: "bad" } });
  ws.drop(4001);
  await assert.rejects(started, (e) => e.code === "invalid_token");
  await assert.rejects(pending, (e) => e.code === "invalid_token");
  assert.equal(states.at(-1), "failed");
  assert.equal(client.running, false);
});

test("a kicked client does not come back on its own", async () => {
  const states = [];
  const client = make({ onState: (s) => states.push(s), getToken: async () => "fresh" });
  const started = client.start();
  await until(() => FakeWS.all.length === 1, "a connection");
  const ws = FakeWS.all[0];
  ws.open();
  ws.recv({ type: "auth_reply", ok: true, userId: "alice" });
  await started;
  const pending = client.send(SESSION, 1);
  ws.recv({ type: "error", code: "kicked" });
  ws.drop(4004);
  await assert.rejects(pending, (e) => e.code === "kicked");
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(FakeWS.all.length, 1, "it connected again");
  assert.equal(states.at(-1), "failed");
  assert.equal(client.running, false);
});

test("token expiry is read from the JWT", () => {
  const payload = Buffer.from(JSON.stringify({ sub: "a", exp: 1234 })).toString("base64url");
  assert.equal(tokenExpiry(`h.${payload}.s`), 1234);
  assert.equal(tokenExpiry("garbage"), null);
  assert.equal(p2pSessionId("bob", "alice"), "p2p:alice:bob");
});

// --- the HTTP streaming fallback (PROTOCOL.md "HTTP streaming transport") -------------------

/** A gateway's --stream endpoint, as fetch and EventSource see it: the test plays the server. */
class FakeStreamGateway {
  constructor() {
    this.posts = []; // frames posted to /stream/<id>, parsed
    this.sources = []; // EventSources opened
    this.polls = []; // {after, resolve} of polls waiting
    const gateway = this;
    this.EventSource = class {
      constructor(url) { this.url = url; this.readyState = 0; gateway.sources.push(this); }
      close() { this.readyState = 2; }
      emit(id, frame) { this.readyState = 1; this.onmessage({ data: JSON.stringify(frame), lastEventId: String(id) }); }
    };
    this.fetch = async (url, init = {}) => {
      const { pathname, searchParams } = new URL(url);
      if (init.method === "POST" && pathname === "/stream") {
        const auth = JSON.parse(init.body);
        assert.equal(auth.type, "auth");
        const body = JSON.stringify({ type: "auth_reply", ok: true, userId: "alice", connId: "c", serverId: "gw",
          stream: "s1" });
        return { ok: true, status: 200, text: async () => body };
      }
      if (init.method === "POST") {
        if (this.limit && init.body.length > this.limit) return { ok: false, status: 413, text: async () => "" };
        const parsed = JSON.parse(init.body);
        this.posts.push(...(Array.isArray(parsed) ? parsed : [parsed]));
        return { ok: true, status: 204, text: async () => "" };
      }
      const after = Number(searchParams.get("after"));
      return new Promise((resolve) => {
        this.polls.push({ after, resolve: (items) => resolve({ ok: true, status: 200, json: async () => items }) });
      });
    };
  }
}

function makeStreaming(gateway, options = {}) {
  FakeWS.all = [];
  const transports = [];
  const client = new IMClient({
    urls: ["ws://gw1.test/ws"], streamUrls: ["http://gw1.test:8082"], token: "t", WebSocket: FakeWS,
    fetch: gateway.fetch, EventSource: gateway.EventSource, onTransport: (t) => transports.push(t),
    retryInitial: 0.01, retryMax: 0.05, pingInterval: 0, syncHold: 0, ...options,
  });
  return { client, transports };
}

test("a blocked WebSocket falls back to Server-Sent Events by itself, and says so", async () => {
  const gateway = new FakeStreamGateway();
  const { client, transports } = makeStreaming(gateway);
  const started = client.start();
  await until(() => FakeWS.all.length === 1, "a WebSocket first");
  FakeWS.all[0].drop(1006); // a proxy breaks it: no frame ever arrives
  await until(() => gateway.sources.length === 1, "an event stream");
  assert.equal(gateway.sources[0].url, "http://gw1.test:8082/stream/s1");
  const reply = await started;
  assert.equal(reply.userId, "alice");
  assert.equal(client.transport, "sse");
  assert.deepEqual(transports, ["sse"]);
  gateway.sources[0].emit(1, { type: "sync_done", count: 0 });
  const sent = client.send(SESSION, { text: "hi" });
  await until(() => gateway.posts.some((f) => f.type === "message"), "the message posted");
  const frame = gateway.posts.find((f) => f.type === "message");
  gateway.sources[0].emit(2, { type: "message_reply", ok: true, clientMsgId: frame.clientMsgId, msgId: "m1",
    sessionId: SESSION, seq: 1, ts: 1 });
  assert.equal((await sent).msgId, "m1");
  await client.stop();
});

test("an event stream on which nothing arrives moves the connection to long polling", async () => {
  const gateway = new FakeStreamGateway();
  const { client, transports } = makeStreaming(gateway, { transports: ["sse", "poll"], sseTimeout: 0.05 });
  const received = [];
  client.onMessage = (m) => { received.push(m.msgId); };
  await client.start();
  await until(() => gateway.polls.length === 1, "a poll once the event stream stayed silent");
  assert.equal(gateway.sources[0].readyState, 2); // the silent one was closed
  assert.equal(client.transport, "poll");
  assert.deepEqual(transports, ["sse", "poll"]);
  assert.equal(gateway.polls[0].after, 0);
  gateway.polls[0].resolve([{ id: 1, frame: { type: "sync_done", count: 0 } },
    { id: 2, frame: { type: "message_send", msgId: "m9", sessionId: SESSION, seq: 1, from: "bob", body: {}, ts: 1 } }]);
  await until(() => gateway.polls.length === 2, "the next poll");
  assert.equal(gateway.polls[1].after, 2); // from the last event id
  await until(() => received.includes("m9"), "the delivery handed over");
  await until(() => gateway.posts.some((f) => f.type === "message_send_reply"), "the ack posted");
  await client.stop();
});
