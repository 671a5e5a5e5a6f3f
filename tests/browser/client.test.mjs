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

test("going away moves to the next gateway at once", async () => {
  const client = make({ retryInitial: 5, retryMax: 5 });
  client.start();
  const ws = await connected(client, 1);
  ws.drop(1001);
  await until(() => FakeWS.all.length === 2, "an immediate reconnect", 500);
  assert.equal(FakeWS.all[1].url, "ws://gw2.test/ws");
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

test("token expiry is read from the JWT", () => {
  const payload = Buffer.from(JSON.stringify({ sub: "a", exp: 1234 })).toString("base64url");
  assert.equal(tokenExpiry(`h.${payload}.s`), 1234);
  assert.equal(tokenExpiry("garbage"), null);
  assert.equal(p2pSessionId("bob", "alice"), "p2p:alice:bob");
});
