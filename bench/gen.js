'use strict';
// imcluster load generator: one scenario per run, driven by bench/run.py.
//
//   node bench/gen.js '<json config>'
//
// Speaks PROTOCOL.md over WebSocket with the `ws` package (no compression:
// the figures measure imcluster, not zlib), or, with cfg.transport "sse" or
// "poll", over the HTTP streaming transport (node's http module, keep-alive:
// POST /stream, frames up as POST /stream/<id>, those queued meanwhile as one
// JSON array, frames down as Server-Sent Events or long polls). Writes one JSON object a line on
// stdout: {"event":"mark","name":...} when a measurement window opens or
// closes (run.py samples the daemons' CPU then), {"event":"connected"} in the
// `conn` scenario (run.py samples RSS, then writes "close" on stdin), and
// finally {"event":"result",...}. Progress goes to stderr.
//
// Latency is measured from the moment a frame is written to the moment its
// message_send is parsed: the send time travels in the body ({"t": ms}),
// taken from performance.timeOrigin + performance.now().
//
// With {"mode":"socketio"} the same scenarios drive the reference peer
// (bench/peers/socketio.js) with socket.io-client: each frame becomes the
// socket.io event named by its `type` (payload: the other fields), each event
// received becomes the frame {type: event, ...payload}, the token travels
// in the handshake (`auth.token`), so `auth` only waits for `sync_done`, and
// each message_send is acknowledged with socket.io's ack callback (the peer
// replies to the sender once its recipients acked).

const WebSocket = require('ws');
const http = require('http');
const crypto = require('crypto');
const readline = require('readline');
const { performance } = require('perf_hooks');

const cfg = JSON.parse(process.argv[2]);
const MODE = cfg.mode || 'imcluster';
const P = cfg.params || {};
const now = () => performance.timeOrigin + performance.now();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const log = (...a) => process.stderr.write(`gen[${cfg.scenario}] ${a.join(' ')}\n`);
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

// --- JWT (HS256), as `imcluster token` mints them
const b64 = (s) => Buffer.from(s).toString('base64url');
function token(sub) {
  const h = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const p = b64(JSON.stringify({ sub, exp: Math.floor(Date.now() / 1000) + 7200 }));
  const s = crypto.createHmac('sha256', cfg.secret).update(`${h}.${p}`).digest('base64url');
  return `${h}.${p}.${s}`;
}

// --- counters shared by every client of this process
const stats = { errors: 0, errorCodes: {}, replyErrors: 0, replyCodes: {}, closes: 0, closeCodes: {} };
function count(map, key) { map[key] = (map[key] || 0) + 1; }

// Generator CPU over a window: fraction of ONE core.
let cpuMark = null;
function markStart(name) {
  cpuMark = { cpu: process.cpuUsage(), t: now() };
  emit({ event: 'mark', name });
}
function markEnd(name) {
  const d = process.cpuUsage(cpuMark.cpu);
  const wall = now() - cpuMark.t;
  emit({ event: 'mark', name });
  return (d.user + d.system) / 1000 / wall;
}

class Latency {
  constructor() { this.v = []; }
  add(ms) { this.v.push(ms); }
  summary() {
    const v = Float64Array.from(this.v).sort();
    const at = (q) => (v.length ? v[Math.min(v.length - 1, Math.floor(q * v.length))] : null);
    const r = (x) => (x === null ? null : Math.round(x * 100) / 100);
    return { n: v.length, p50: r(at(0.5)), p90: r(at(0.9)), p99: r(at(0.99)), max: r(v.length ? v[v.length - 1] : null) };
  }
}

class Client {
  constructor(url, user) {
    this.url = url;
    this.user = user;
    this.acks = [];
    this.ackScheduled = false;
    this.seen = new Set();
    this.dups = 0;
    this.onDelivery = null; // (frame, client)
    this.onReply = null; // (frame, client)
    this.onOther = null;
    this.synced = 0;
    this.closing = false;
  }

  open() {
    return new Promise((resolve, reject) => {
      const opts = { perMessageDeflate: false, handshakeTimeout: 30000 };
      // a loopback source address of its own (127.0.0.2, ...): ~28,000 ports each
      if (this.localAddress) opts.localAddress = this.localAddress;
      const ws = new WebSocket(this.url, opts);
      this.ws = ws;
      ws.on('open', resolve);
      ws.on('error', (e) => reject(e));
      ws.on('message', (data) => this.frame(JSON.parse(data)));
      ws.on('close', (code) => {
        if (!this.closing) { stats.closes++; count(stats.closeCodes, code); }
        if (this.authWait) this.authWait.reject(new Error(`closed ${code} before auth`));
      });
    });
  }

  send(obj) { this.ws.send(JSON.stringify(obj)); }

  // auth, then wait for sync_done: resolves with sync_done.count
  auth() {
    return new Promise((resolve, reject) => {
      this.authWait = { resolve, reject };
      this.send({ type: 'auth', token: token(this.user), device: 'bench' });
    });
  }

  frame(f) {
    switch (f.type) {
      case 'message_send':
        if (this.seen.has(f.msgId)) this.dups++; else this.seen.add(f.msgId);
        if (this.onDelivery) this.onDelivery(f, this);
        this.ack(f.msgId);
        break;
      case 'message_reply':
        if (!f.ok) { stats.replyErrors++; count(stats.replyCodes, f.error && f.error.code); }
        if (this.onReply) this.onReply(f, this);
        break;
      case 'auth_reply':
        if (!f.ok) this.authWait.reject(new Error(`auth failed: ${JSON.stringify(f.error)}`));
        break;
      case 'sync_done':
        if (this.authWait) { const w = this.authWait; this.authWait = null; w.resolve(f.count); }
        else this.syncedEarly = f.count;
        break;
      case 'error':
        stats.errors++; count(stats.errorCodes, f.code);
        break;
      default:
        if (this.onOther) this.onOther(f, this);
    }
  }

  // acknowledge what arrived in one event-loop turn with one frame, as a client app would
  ack(msgId) {
    this.acks.push(msgId);
    if (this.ackScheduled) return;
    this.ackScheduled = true;
    setImmediate(() => {
      this.ackScheduled = false;
      while (this.acks.length) this.send({ type: 'message_send_reply', msgIds: this.acks.splice(0, 500) });
    });
  }

  close() { this.closing = true; if (this.ws) this.ws.close(1000); }
}

// the same client over socket.io (the reference peer): see the header
class SioClient extends Client {
  open() {
    const { io } = require('socket.io-client');
    return new Promise((resolve, reject) => {
      // forceNew: one connection per client (socket.io-client multiplexes a URL otherwise)
      const s = io(this.url, { transports: ['websocket'], forceNew: true, reconnection: false, timeout: 30000,
        auth: { token: token(this.user) } });
      this.sock = s;
      s.on('connect', resolve);
      s.on('connect_error', (e) => reject(e));
      s.onAny((type, payload, ack) => {
        this.frame({ type, ...payload });
        // the peer asks for socket.io's acknowledgement of each message_send (as ack() below would)
        if (typeof ack === 'function') ack();
      });
      s.on('disconnect', (reason) => {
        if (!this.closing) { stats.closes++; count(stats.closeCodes, reason); }
        if (this.authWait) this.authWait.reject(new Error(`closed ${reason} before sync_done`));
      });
    });
  }

  send(obj) {
    const { type, ...rest } = obj;
    this.sock.emit(type, rest);
  }

  // acknowledged through socket.io's ack callback as each message_send arrives
  ack() {}

  auth() {
    if (this.syncedEarly !== undefined) return Promise.resolve(this.syncedEarly);
    return new Promise((resolve, reject) => { this.authWait = { resolve, reject }; });
  }

  close() { this.closing = true; this.sock.disconnect(); }
}

// the HTTP streaming transport: the same surface as Client (open, send, auth, close)
const httpAgent = new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 1024 });

class StreamClient extends Client {
  constructor(url, user, mode) {
    super(url, user);
    this.mode = mode;
    this.base = new URL(url);
    this.id = null;
    this.queue = [];
    this.posting = false;
    this.lastId = 0;
    this.listening = null;
  }

  open() { return Promise.resolve(); }

  request(method, path, body, headers, onResponse) {
    const req = http.request({ agent: httpAgent, host: this.base.hostname, port: this.base.port, method, path,
      headers: { ...(body !== null ? { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } : {}),
        ...headers } }, onResponse);
    req.on('error', (e) => { if (!this.closing) { stats.closes++; count(stats.closeCodes, `http ${e.code}`); } });
    if (body !== null) req.end(body); else req.end();
    return req;
  }

  send(obj) {
    if (this.closing) return;
    this.queue.push(JSON.stringify(obj));
    this.pump();
  }

  pump() {
    if (this.posting || !this.queue.length || this.closing) return;
    this.posting = true;
    const readAll = (res, done) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { text += c; });
      res.on('end', () => done(res.statusCode, text));
    };
    if (this.id === null) {
      this.request('POST', '/stream', this.queue.shift(), {}, (res) => readAll(res, (status, text) => {
        this.posting = false;
        const f = JSON.parse(text);
        this.id = f.stream;
        delete f.stream;
        this.frame(f);
        if (status === 200 && this.id) { this.listen(); this.pump(); }
      }));
      return;
    }
    const batch = [this.queue.shift()];
    let size = batch[0].length;
    while (this.queue.length && size + this.queue[0].length + batch.length + 2 < 60000) {
      size += this.queue[0].length;
      batch.push(this.queue.shift());
    }
    const body = batch.length === 1 ? batch[0] : `[${batch.join(',')}]`;
    this.request('POST', `/stream/${this.id}`, body, {}, (res) => {
      res.resume();
      res.on('end', () => {
        this.posting = false;
        if (res.statusCode !== 204 && !this.closing) { stats.closes++; count(stats.closeCodes, `post ${res.statusCode}`); }
        this.pump();
      });
    });
  }

  listen() {
    if (this.closing) return;
    if (this.mode === 'poll') {
      this.listening = this.request('GET', `/stream/${this.id}?after=${this.lastId}`, null, {}, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c) => { text += c; });
        res.on('end', () => {
          if (res.statusCode === 404) { if (!this.closing) { stats.closes++; count(stats.closeCodes, 404); } return; }
          for (const item of JSON.parse(text)) { this.lastId = item.id; this.frame(item.frame); }
          this.listen();
        });
      });
      return;
    }
    this.listening = this.request('GET', `/stream/${this.id}`, null,
      { accept: 'text/event-stream', 'last-event-id': String(this.lastId) }, (res) => {
        let buffer = '';
        res.setEncoding('utf8');
        res.on('data', (chunk) => {
          buffer += chunk;
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let data = null;
            for (const line of block.split('\n')) {
              if (line.startsWith('id: ')) this.lastId = Number(line.slice(4));
              else if (line.startsWith('data: ')) data = line.slice(6);
            }
            if (data !== null) this.frame(JSON.parse(data));
          }
        });
        res.on('end', () => {
          if (res.statusCode === 404 || this.closing) {
            if (!this.closing) { stats.closes++; count(stats.closeCodes, 404); }
            return;
          }
          setTimeout(() => this.listen(), 50); // as EventSource: again, with Last-Event-ID
        });
      });
  }

  close() {
    this.closing = true;
    if (this.listening) this.listening.destroy();
  }
}

function newClient(url, user) {
  if (MODE === 'socketio') return new SioClient(url, user);
  return cfg.transport === 'sse' || cfg.transport === 'poll' ? new StreamClient(url, user, cfg.transport)
    : new Client(url, user);
}

// open + auth + sync_done for every spec, `concurrency` at a time; with `failures`
// (an array) a client that fails is recorded there and left out instead of failing all
async function connectAll(specs, concurrency = 200, failures = null) {
  const clients = new Array(specs.length);
  let next = 0;
  async function worker() {
    while (next < specs.length) {
      const i = next++;
      const c = newClient(specs[i].url, specs[i].user);
      if (specs[i].local) c.localAddress = specs[i].local;
      if (failures === null) {
        await c.open();
        await c.auth();
        clients[i] = c;
        continue;
      }
      // a client that is neither set up nor refused within P.clientTimeout s is given up
      let stage = 'open', timer = null;
      const limit = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`no ${stage} within ${P.clientTimeout || 60}s`)),
          (P.clientTimeout || 60) * 1000);
      });
      try {
        const work = (async () => {
          await c.open();
          stage = 'sync_done';
          await c.auth();
        })();
        work.catch(() => {}); // it may still fail after the limit: already counted
        await Promise.race([work, limit]);
        clients[i] = c;
      } catch (e) {
        failures.push(String(e && e.message || e));
        c.authWait = null;
        try { c.close(); } catch (_) { /* never opened */ }
      } finally {
        clearTimeout(timer);
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(concurrency, specs.length) }, worker));
  return clients;
}

async function waitUntil(cond, timeoutMs) {
  const end = now() + timeoutMs;
  while (!cond()) {
    if (now() > end) return false;
    await sleep(20);
  }
  return true;
}

// call sendOne(i) `rate` times a second for `seconds`
function sendAtRate(rate, seconds, sendOne) {
  const total = Math.round(rate * seconds);
  const t0 = now();
  let sent = 0;
  return new Promise((resolve) => {
    const tick = () => {
      const due = Math.min(total, Math.floor(((now() - t0) / 1000) * rate) + 1);
      while (sent < due) sendOne(sent++);
      if (sent >= total) { clearInterval(iv); resolve(sent); }
    };
    const iv = setInterval(tick, 1);
    tick();
  });
}

const gw = (i) => cfg.gateways[i % cfg.gateways.length];
// a streamed twin of a scenario (p2p-latency-sse) has users and clientMsgIds of its own: the same
// ids again would be duplicates of its WebSocket twin's messages
const RUN = cfg.transport && cfg.transport !== 'ws' ? `${cfg.run}-${cfg.transport}` : cfg.run;
const user = (kind, i) => `${RUN}.${kind}${i}`;
let cmid = 0;

// ---------------------------------------------------------------- scenarios

async function conn() {
  const n = P.n, offset = P.offset || 0;
  // P.localAddresses: source addresses taken in turn; P.tolerant: count failed connects, go on
  const locals = P.localAddresses || [];
  const specs = [];
  for (let i = offset; i < offset + n; i++) {
    specs.push({ url: gw(i), user: user('c', i), local: locals.length ? locals[i % locals.length] : undefined });
  }
  const failures = P.tolerant ? [] : null;
  const t0 = now();
  const clients = (await connectAll(specs, P.concurrency || 200, failures)).filter((c) => c);
  const seconds = (now() - t0) / 1000;
  const failed = failures ? failures.length : 0;
  emit({ event: 'connected', n, ok: clients.length, failed, seconds,
    first_failures: failures ? [...new Set(failures)].slice(0, 5) : [], rss_kb: Math.round(process.memoryUsage().rss / 1024) });
  // hold them idle until run.py has read the gateways' RSS
  const rl = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => rl.on('line', (l) => { if (l.trim() === 'close') resolve(); }));
  rl.close();
  for (const c of clients) c.close();
  await sleep(200);
  return { connected: clients.length, failed, seconds, rate: clients.length / seconds, unexpected_closes: stats.closes };
}

// pairs: sender i on gateway A, receiver i on gateway B, session p2p:<a>:<b>
async function makePairs(kind) {
  const pairs = P.pairs;
  const specs = [];
  for (let i = 0; i < pairs; i++) {
    specs.push({ url: cfg.gateways[0], user: user(`${kind}s`, i) });
    specs.push({ url: cfg.gateways[1 % cfg.gateways.length], user: user(`${kind}r`, i) });
  }
  const clients = await connectAll(specs);
  const out = [];
  for (let i = 0; i < pairs; i++) {
    const s = clients[2 * i], r = clients[2 * i + 1];
    const session = 'p2p:' + [s.user, r.user].sort().join(':');
    out.push({ s, r, session });
  }
  return out;
}

function p2pTracker(pairs) {
  const t = { sent: 0, replied: 0, ok: 0, delivered: 0, lat: new Latency(), replyLat: new Latency(), expected: [],
    inWindow: false, windowDelivered: 0, windowLat: new Latency(), sentAt: new Map() };
  for (const p of pairs) {
    p.s.onReply = (f) => {
      t.replied++;
      const t0 = t.sentAt.get(f.clientMsgId);
      t.sentAt.delete(f.clientMsgId);
      if (t0 !== undefined) t.replyLat.add(now() - t0);
      if (f.ok) { t.ok++; t.expected.push([p.r, f.msgId]); }
      if (p.onReply) p.onReply(f);
    };
    p.r.onDelivery = (f) => {
      const ms = now() - f.body.t;
      t.delivered++;
      t.lat.add(ms);
      if (t.inWindow) { t.windowDelivered++; t.windowLat.add(ms); }
    };
  }
  t.send = (p) => {
    const id = `${RUN}-${cmid++}`;
    const ts = now();
    t.sentAt.set(id, ts);
    p.s.send({ type: 'message', clientMsgId: id, sessionId: p.session, body: { t: ts } });
    t.sent++;
  };
  t.finish = async (pairs_) => {
    await waitUntil(() => t.replied >= t.sent && t.delivered >= t.ok, P.drain * 1000);
    await sleep(300); // late duplicates
    let lost = 0;
    for (const [r, id] of t.expected) if (!r.seen.has(id)) lost++;
    const dups = pairs_.reduce((a, p) => a + p.r.dups, 0);
    return { sent: t.sent, replied_ok: t.ok, unreplied: t.sent - t.replied, delivered: t.delivered, lost, duplicated: dups };
  };
  return t;
}

async function p2pLatency() {
  const pairs = await makePairs('l');
  const t = p2pTracker(pairs);
  markStart('start');
  await sendAtRate(P.rate, P.seconds, (i) => t.send(pairs[i % pairs.length]));
  const tail = await t.finish(pairs);
  const gen_cpu = markEnd('end');
  for (const p of pairs) { p.s.close(); p.r.close(); }
  return { ...tail, latency_ms: t.lat.summary(), reply_latency_ms: t.replyLat.summary(), gen_cpu };
}

async function p2pThroughput() {
  const pairs = await makePairs('t');
  const t = p2pTracker(pairs);
  let running = true;
  for (const p of pairs) p.onReply = () => { if (running) t.send(p); };
  for (const p of pairs) for (let k = 0; k < P.window; k++) t.send(p);
  await sleep(P.warmup * 1000);
  t.inWindow = true;
  markStart('start');
  const w0 = now();
  await sleep(P.seconds * 1000);
  t.inWindow = false;
  const wall = (now() - w0) / 1000;
  const gen_cpu = markEnd('end');
  running = false;
  const tail = await t.finish(pairs);
  for (const p of pairs) { p.s.close(); p.r.close(); }
  return { ...tail, delivered_per_s: t.windowDelivered / wall, latency_ms: t.windowLat.summary(),
    reply_latency_ms: t.replyLat.summary(), gen_cpu };
}

async function fanout() {
  const m = P.members;
  const specs = [];
  for (let i = 0; i < m; i++) specs.push({ url: gw(i), user: user('f', i) });
  const members = await connectAll(specs);
  const sessionId = `${cfg.run}.group`;
  const created = new Promise((resolve, reject) => {
    members[0].onOther = (f) => {
      if (f.type === 'session_reply') (f.ok ? resolve(f) : reject(new Error(JSON.stringify(f))));
    };
  });
  members[0].send({ type: 'session_create', id: 'r1', sessionId, members: members.slice(1).map((c) => c.user) });
  await created;
  const senders = members.slice(0, P.senders);
  const phases = {};
  let phase = null;
  const expected = [];
  let sent = 0, replied = 0, ok = 0, delivered = 0;
  let running = false;
  for (const s of senders) {
    s.onReply = (f) => {
      replied++;
      if (f.ok) { ok++; expected.push([s, f.msgId]); }
      if (running) send(s);
    };
  }
  for (const c of members) {
    c.onDelivery = (f) => {
      delivered++;
      const ph = phases[f.body.p];
      if (ph && ph.inWindow) { ph.delivered++; ph.lat.add(now() - f.body.t); }
    };
  }
  function send(s) {
    s.send({ type: 'message', clientMsgId: `${RUN}-${cmid++}`, sessionId, body: { t: now(), p: phase } });
    sent++;
  }
  async function drain() {
    await waitUntil(() => replied >= sent && delivered >= ok * (m - 1), P.drain * 1000);
  }
  const out = {};
  // fixed rate
  phase = 'rate';
  phases.rate = { delivered: 0, lat: new Latency(), inWindow: true };
  markStart('start');
  let w0 = now();
  await sendAtRate(P.rate, P.seconds, (i) => send(senders[i % senders.length]));
  await drain();
  phases.rate.inWindow = false;
  out.rate = { msgs_per_s: P.rate, deliveries_per_s: phases.rate.delivered / ((now() - w0) / 1000),
    latency_ms: phases.rate.lat.summary() };
  // as fast as each sender's in-flight window allows: one step per window
  // size (P.windows, growing), since a closed loop with too few messages in
  // flight measures the latency, not what the cluster can take
  running = true;
  out.steps = [];
  let inFlight = 0;
  for (const win of P.windows) {
    phase = `max${win}`;
    const ph = phases[phase] = { delivered: 0, lat: new Latency(), inWindow: false };
    for (const s of senders) for (let k = inFlight; k < win; k++) send(s);
    inFlight = win;
    await sleep(P.warmup * 1000);
    ph.inWindow = true;
    w0 = now();
    await sleep(P.seconds * 1000);
    ph.inWindow = false;
    const wall = (now() - w0) / 1000;
    out.steps.push({ window: win, deliveries_per_s: ph.delivered / wall, latency_ms: ph.lat.summary() });
  }
  running = false;
  out.max = out.steps.reduce((a, b) => (b.deliveries_per_s > a.deliveries_per_s ? b : a));
  await drain();
  await sleep(300);
  const gen_cpu = markEnd('end');
  let lost = 0;
  for (const [s, id] of expected) for (const c of members) if (c !== s && !c.seen.has(id)) lost++;
  const dups = members.reduce((a, c) => a + c.dups, 0);
  for (const c of members) c.close();
  return { ...out, sent, replied_ok: ok, unreplied: sent - replied, expected_deliveries: ok * (m - 1), delivered,
    lost, duplicated: dups, gen_cpu };
}

async function sync() {
  const [s] = await connectAll([{ url: cfg.gateways[0], user: user('ss', 0) }]);
  const target = user('sr', 0);
  const session = 'p2p:' + [s.user, target].sort().join(':');
  const backlog = P.backlog;
  let sent = 0, ok = 0, replied = 0;
  s.onReply = (f) => { replied++; if (f.ok) ok++; if (sent < backlog) fill(); };
  const fill = () => {
    s.send({ type: 'message', clientMsgId: `${RUN}-${cmid++}`, sessionId: session, body: { t: now(), text: 'backlog' } });
    sent++;
  };
  const tf = now();
  for (let k = 0; k < Math.min(P.window, backlog); k++) fill();
  await waitUntil(() => replied >= backlog, 120000);
  const fill_s = (now() - tf) / 1000;
  const r = newClient(cfg.gateways[1 % cfg.gateways.length], target);
  let got = 0;
  r.onDelivery = () => { got++; };
  markStart('start');
  const t0 = now();
  await r.open();
  const t1 = now();
  const n = await r.auth();
  const t2 = now();
  const gen_cpu = markEnd('end');
  await sleep(300);
  r.close(); s.close();
  return { backlog, stored: ok, fill_seconds: fill_s, sync_done_count: n, received: got, duplicated: r.dups,
    lost: ok - r.seen.size, seconds: (t2 - t1) / 1000, connect_to_sync_done_s: (t2 - t0) / 1000,
    msgs_per_s: got / ((t2 - t1) / 1000), gen_cpu };
}

// the ceiling: the same frames, echoed by a bare Autobahn server
async function echo() {
  const conns = [];
  for (let i = 0; i < P.conns; i++) {
    const c = new Client(cfg.echoUrl, 'echo');
    await c.open();
    conns.push(c);
  }
  let running = true, inWindow = false, done = 0;
  const lat = new Latency();
  for (const c of conns) {
    c.ws.removeAllListeners('message');
    c.ws.on('message', (data) => {
      const f = JSON.parse(data);
      if (inWindow) { done++; lat.add(now() - f.body.t); }
      if (running) c.send({ type: 'message', clientMsgId: `${RUN}-${cmid++}`, sessionId: 'p2p:a:b', body: { t: now() } });
    });
  }
  for (const c of conns) for (let k = 0; k < P.window; k++) {
    c.send({ type: 'message', clientMsgId: `${RUN}-${cmid++}`, sessionId: 'p2p:a:b', body: { t: now() } });
  }
  await sleep(P.warmup * 1000);
  inWindow = true;
  markStart('start');
  const w0 = now();
  await sleep(P.seconds * 1000);
  inWindow = false;
  const wall = (now() - w0) / 1000;
  const gen_cpu = markEnd('end');
  running = false;
  await sleep(200);
  for (const c of conns) c.close();
  return { echoes_per_s: done / wall, latency_ms: lat.summary(), gen_cpu };
}

const SCENARIOS = { conn, 'p2p-latency': p2pLatency, 'p2p-throughput': p2pThroughput, fanout, sync, echo };

(async () => {
  try {
    const result = await SCENARIOS[cfg.scenario.replace(/-(sse|poll)$/, '')]();
    emit({ event: 'result', scenario: cfg.scenario, ...result, errors: stats });
    process.exit(0);
  } catch (e) {
    emit({ event: 'failed', scenario: cfg.scenario, error: String(e && e.stack || e), errors: stats });
    process.exit(1);
  }
})();
