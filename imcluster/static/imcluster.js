// imcluster.js: the imcluster client for browsers (and any runtime with WebSocket).
//
// One dependency-free ES module, no build step. It speaks PROTOCOL.md over
// WebSocket with the same guarantees as the Python client
// (imcluster.client.Client):
//
//   import { IMClient, p2pSessionId } from "/app/imcluster.js";
//   const client = new IMClient({
//     urls: ["ws://127.0.0.1:8080/ws"], token,          // or getToken: async () => token
//     streamUrls: ["http://127.0.0.1:8082"],             // optional: the gateways' --stream endpoints
//     onTransport: (t) => show(t),                       // "websocket", "sse" or "poll"
//     onMessage: (m) => show(m),                         // once per msgId; may return a Promise
//     onReadReceipt: (r) => markRead(r),
//     onState: (s) => status(s),                         // connecting, authenticating, ready, waiting, stopped, failed
//   });
//   await client.start();
//   const reply = await client.send(p2pSessionId("alice", "bob"), { text: "hi" });
//   const page = await client.history(reply.sessionId, { limit: 50 });
//   client.read(reply.sessionId, reply.seq);
//
// * Reconnects with exponential backoff (with jitter), trying the next URL
//   each time; "going away" (close 1001) moves to the next gateway at once.
//   Every connection authenticates again (getToken is asked each time and
//   refreshMargin seconds before the token's exp).
// * send() resolves with the message_reply once the server stored the
//   message; unanswered messages are sent again, in order, with the same
//   clientMsgId after a reconnect (the server stores them once);
//   "unavailable" and "rate_limited" are retried; other errors reject with
//   an IMError carrying the server's code.
// * onMessage is called once per msgId, one message at a time; the
//   message is acknowledged (message_send_reply, coalesced) after the
//   handler returned (or its Promise resolved). Duplicates are acknowledged
//   again silently. Deliveries that arrive before sync_done are held and
//   handed over sorted by session and seq (sync and live deliveries race).
// * WebSocket first; where it cannot connect (a proxy that breaks it) and
//   streamUrls are given, the HTTP streaming transport of PROTOCOL.md:
//   Server-Sent Events, and long polling when no event arrives on the event
//   stream within sseTimeout seconds (a proxy that buffers it). The client
//   moves on by itself, keeps what works for its reconnects, and says which
//   one it uses (client.transport, onTransport).
// * A JSON ping every pingInterval seconds; a silent connection is replaced.
// * Every frame is measured before it is sent: one over maxFrameSize (65536 bytes, the
//   gateway's default; an auth_reply naming maxFrameSize lowers it) rejects at once with
//   code "too_large" instead of making the gateway close the socket (1009). When a gateway
//   with a smaller limit closes anyway, the largest unanswered frame sent on that socket
//   rejects with "too_large" and is never sent again.
// * "going away" (1001) reconnects spread over goingAwaySpread seconds (3), so that a drained
//   gateway's clients do not all connect and sync on the next one at once.
// * Version 1.1: events (kind "recall", "edit", "members") come to onMessage like messages;
//   recall(msgId), edit(msgId, body), typing(sessionId) (at most one a second per session),
//   subscribePresence(users) (made again on every connection; onPresence gets each change),
//   onTyping, onDeliveryReceipt.
// * A refused token with no getToken (or maxAuthFailures refusals in a row)
//   stops the client: start() and pending calls reject with code
//   "invalid_token"/"token_expired"/"token_revoked" (or "kicked": an operator threw the user
//   out, the client does not come back on its own) and onState("failed") is called.

export const STATES = Object.freeze({
  STOPPED: "stopped", CONNECTING: "connecting", AUTHENTICATING: "authenticating",
  READY: "ready", WAITING: "waiting", FAILED: "failed",
});

const RETRY_CODES = new Set(["unavailable", "rate_limited"]);
const AUTH_CODES = new Set(["invalid_token", "token_expired", "token_revoked"]);
const ACK_CHUNK = 500;
/** The gateway's default max_frame_size (PROTOCOL.md "Framing"). */
export const DEFAULT_MAX_FRAME_SIZE = 65536;

const encoder = new TextEncoder();

/** The bytes of a frame on the wire (UTF-8 JSON). */
export function frameSize(frame) {
  return encoder.encode(JSON.stringify(frame)).length;
}

/** A message_send (or history entry) that is an event (recall, edit, members...), not a message. */
export function isEvent(m) {
  return m != null && m.kind != null && m.kind !== "message";
}

/** An error answered by the server (code as in PROTOCOL.md) or by the client itself. */
export class IMError extends Error {
  constructor(code, message = "", extra = {}) {
    super(message ? `${code}: ${message}` : code);
    this.name = "IMError";
    this.code = code;
    Object.assign(this, extra);
  }
}

/** The 1:1 session of users a and b: p2p:<a>:<b> with the ids sorted. */
export function p2pSessionId(a, b) {
  const [x, y] = [a, b].sort();
  return `p2p:${x}:${y}`;
}

/** A fresh clientMsgId (32 hex characters). */
export function newClientMsgId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID().replace(/-/g, "");
  const bytes = new Uint8Array(16);
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The exp claim of a JWT (seconds since the epoch), read without verifying it; null if none. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(part + "=".repeat((4 - (part.length % 4)) % 4));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

// what a streaming connection's last error frame means as a WebSocket close code (PROTOCOL.md)
const CLOSE_CODES = new Map([
  ["going_away", 1001], ["too_large", 1009], ["unavailable", 1013], ["auth_timeout", 4001],
  ["invalid_token", 4001], ["token_expired", 4002], ["slow_consumer", 4003], ["kicked", 4004],
  ["token_revoked", 4004],
]);

/**
 * A connection over PROTOCOL.md's HTTP streaming transport that looks like a WebSocket to IMClient
 * (readyState, send, close, onopen, onmessage, onclose, onerror).
 *
 * The first frame sent (the auth) is POST /stream; its answer is the auth_reply, which carries the
 * stream id. Frames go up with POST /stream/<id> (those queued meanwhile as one JSON array) and
 * come down on GET /stream/<id>: an EventSource ("sse"), or long polls with ?after=<last id>
 * ("poll"). An event stream on which nothing arrives within sseTimeout seconds of opening (the
 * auth is always followed by sync_done) is taken for one a proxy buffers: the connection moves to
 * long polling, from the last event id, and onmode("poll") says so. A 404 means the gateway
 * closed the connection: onclose gets the close code of its last error frame.
 */
export class StreamSocket {
  constructor(baseUrl, { mode = "sse", fetch = globalThis.fetch, EventSource = globalThis.EventSource,
    sseTimeout = 8, pollRetry = 1, maxBody = 65536, onmode = null } = {}) {
    this.base = String(baseUrl).replace(/\/+$/, "");
    this.mode = mode === "poll" || !EventSource ? "poll" : "sse";
    this.fetch = fetch.bind(globalThis);
    this.EventSource = EventSource;
    this.sseTimeout = sseTimeout;
    this.pollRetry = pollRetry;
    this.maxBody = maxBody;
    this.onmode = onmode;
    this.readyState = 0;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this.id = null;
    this.lastEventId = 0;
    this._queue = [];
    this._posting = false;
    this._es = null;
    this._poll = null; // the AbortController of the poll in flight
    this._sseTimer = null;
    this._lastCode = null;
    this._single = 0;
    setTimeout(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      if (this.onopen) this.onopen({});
    }, 0);
  }

  send(text) {
    if (this.readyState !== 1) return;
    this._queue.push(String(text));
    this._pump();
  }

  close(code = 1000, reason = "") {
    this._closed(code, reason);
  }

  _deliver(data) {
    if (this.readyState !== 1) return;
    try {
      const frame = JSON.parse(data);
      if (frame && frame.type === "error" && typeof frame.code === "string") this._lastCode = frame.code;
    } catch { /* IMClient ignores it too */ }
    if (this.onmessage) this.onmessage({ data });
  }

  _closed(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this._queue = [];
    if (this._es) { this._es.close(); this._es = null; }
    if (this._poll) { this._poll.abort(); this._poll = null; }
    clearTimeout(this._sseTimer);
    setTimeout(() => { if (this.onclose) this.onclose({ code, reason, wasClean: code === 1000 }); }, 0);
  }

  _over() {
    // the gateway ended the connection: its last error frame said why
    this._closed(CLOSE_CODES.get(this._lastCode) || 1006, this._lastCode || "stream closed");
  }

  async _request(path, body) {
    // text/plain: a "simple" cross-origin request, no preflight per frame
    return this.fetch(this.base + path, {
      method: "POST", body, headers: { "content-type": "text/plain;charset=UTF-8" },
      cache: "no-store", credentials: "omit",
    });
  }

  async _pump() {
    if (this._posting || !this._queue.length || this.readyState !== 1) return;
    this._posting = true;
    try {
      if (this.id === null) {
        const body = this._queue.shift();
        let response, text;
        try {
          response = await this._request("/stream", body);
          text = await response.text();
        } catch (e) {
          this._closed(1006, "the stream endpoint cannot be reached");
          return;
        }
        let frame = null;
        try { frame = JSON.parse(text); } catch { /* not ours */ }
        if (!frame || typeof frame !== "object") {
          this._closed(1006, `POST /stream answered ${response.status}`);
          return;
        }
        const id = frame.stream;
        delete frame.stream;
        this._deliver(JSON.stringify(frame));
        if (!response.ok || typeof id !== "string") {
          this._over();
          return;
        }
        this.id = id;
        this._listen();
      } else {
        const batch = [this._queue.shift()];
        let size = batch[0].length;
        if (this._single) this._single -= 1;
        while (!this._single && this._queue.length && size + this._queue[0].length + 2 + batch.length < this.maxBody / 4) {
          size += this._queue[0].length;
          batch.push(this._queue.shift());
        }
        const body = batch.length === 1 ? batch[0] : `[${batch.join(",")}]`;
        let response;
        try {
          response = await this._request(`/stream/${encodeURIComponent(this.id)}`, body);
        } catch {
          this._closed(1006, "the stream endpoint cannot be reached");
          return;
        }
        if (response.status === 404) {
          this._over();
          return;
        }
        if (response.status === 413) {
          // over the gateway's limit: say so as an error frame about that frame (IMClient fails
          // it and never posts it again); frames batched together are posted one by one
          if (batch.length > 1) {
            this._queue.unshift(...batch);
            this._single = batch.length;
          } else {
            let ref;
            try { const f = JSON.parse(batch[0]); ref = f.clientMsgId || f.id; } catch { /* not JSON */ }
            this._deliver(JSON.stringify({ type: "error", code: "too_large", ref,
              message: "the gateway refused the frame for its size (413)" }));
          }
        }
      }
    } finally {
      this._posting = false;
    }
    this._pump();
  }

  _listen() {
    if (this.readyState !== 1) return;
    if (this.mode === "poll") {
      this._nextPoll();
      return;
    }
    const es = new this.EventSource(`${this.base}/stream/${encodeURIComponent(this.id)}`);
    this._es = es;
    let heard = false;
    this._sseTimer = setTimeout(() => {
      if (es !== this._es || heard) return;
      // nothing on the event stream, where sync_done at least was due: a proxy buffers it
      es.close();
      this._es = null;
      this.mode = "poll";
      if (this.onmode) this.onmode("poll");
      this._nextPoll();
    }, this.sseTimeout * 1000);
    es.onmessage = (e) => {
      if (es !== this._es) return;
      heard = true;
      const n = Number(e.lastEventId);
      if (Number.isInteger(n) && n > this.lastEventId) this.lastEventId = n;
      this._deliver(e.data);
    };
    es.onerror = () => {
      if (es !== this._es) return;
      // CONNECTING: EventSource reconnects by itself with Last-Event-ID; CLOSED: a 404, the end
      if (es.readyState === 2) this._over();
    };
  }

  async _nextPoll() {
    let failingSince = null;
    while (this.readyState === 1) {
      const controller = new AbortController();
      this._poll = controller;
      let response, items;
      try {
        response = await this.fetch(`${this.base}/stream/${encodeURIComponent(this.id)}?after=${this.lastEventId}`,
          { signal: controller.signal, cache: "no-store", credentials: "omit" });
        if (response.status === 404) {
          this._over();
          return;
        }
        items = response.ok ? await response.json() : [];
        failingSince = null;
      } catch (e) {
        if (this.readyState !== 1) return;
        failingSince = failingSince ?? Date.now();
        if (Date.now() - failingSince > 30000) {
          this._closed(1006, "the stream endpoint cannot be reached");
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, this.pollRetry * 1000));
        continue;
      }
      for (const item of items) {
        if (item && Number.isInteger(item.id) && item.id > this.lastEventId) {
          this.lastEventId = item.id;
          this._deliver(JSON.stringify(item.frame));
        }
      }
    }
  }
}

function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
  return { promise, resolve, reject };
}

export class IMClient {
  /**
   * @param {object} options urls (string or list), token or getToken, device,
   *   onMessage, onReadReceipt, onSyncDone, onState, and tuning: retryInitial,
   *   retryMax, pingInterval, pingTimeout, authTimeout, refreshMargin,
   *   maxInFlight, dedupSize, sendTimeout (null: none), requestTimeout,
   *   syncHold, maxAuthFailures; WebSocket (an implementation, for tests).
   */
  constructor(options) {
    const o = { ...options };
    this.urls = typeof o.urls === "string" ? [o.urls] : [...(o.urls || [])];
    if (!this.urls.length) throw new TypeError("at least one gateway URL is needed");
    for (const url of this.urls) {
      if (!/^wss?:\/\/[^/]/i.test(url)) throw new TypeError(`not a ws:// or wss:// URL: ${url}`);
    }
    this.streamUrls = typeof o.streamUrls === "string" ? [o.streamUrls] : [...(o.streamUrls || [])];
    for (const url of this.streamUrls) {
      if (!/^https?:\/\/[^/]/i.test(url)) throw new TypeError(`not an http:// or https:// URL: ${url}`);
    }
    // the order in which transports are tried; the streaming ones only with streamUrls
    this.transports = (o.transports || ["websocket", "sse", "poll"])
      .filter((t) => t === "websocket" || (this.streamUrls.length && (t === "sse" || t === "poll")));
    if (!this.transports.length) throw new TypeError("no usable transport (streaming ones need streamUrls)");
    this.onTransport = o.onTransport || null;
    this.sseTimeout = o.sseTimeout ?? 8;
    this.fetch = o.fetch || globalThis.fetch;
    this.EventSource = o.EventSource || globalThis.EventSource;
    if (!o.token && !o.getToken) throw new TypeError("give token or getToken");
    this.token = o.token || null;
    this.getToken = o.getToken || null;
    this.device = o.device ?? null;
    this.onMessage = o.onMessage || null;
    this.onReadReceipt = o.onReadReceipt || null;
    this.onSyncDone = o.onSyncDone || null;
    this.onState = o.onState || null;
    this.onTyping = o.onTyping || null;
    this.onPresence = o.onPresence || null;
    this.onDeliveryReceipt = o.onDeliveryReceipt || null;
    this.maxFrameSize = o.maxFrameSize ?? DEFAULT_MAX_FRAME_SIZE;
    this.goingAwaySpread = o.goingAwaySpread ?? 3;
    this.typingInterval = o.typingInterval ?? 1;
    /** Presence of the subscribed users: userId -> {userId, online, since | ts}. */
    this.presence = new Map();
    this._presenceUsers = new Set();
    this._typingSent = new Map();
    this.WebSocket = o.WebSocket || globalThis.WebSocket;
    this.retryInitial = o.retryInitial ?? 0.5;
    this.retryMax = o.retryMax ?? 30;
    this.pingInterval = o.pingInterval ?? 30;
    this.pingTimeout = o.pingTimeout ?? 10;
    this.authTimeout = o.authTimeout ?? 15;
    this.connectTimeout = o.connectTimeout ?? 10;
    this.refreshMargin = o.refreshMargin ?? 60;
    this.maxInFlight = o.maxInFlight ?? 64;
    this.dedupSize = o.dedupSize ?? 10000;
    this.sendTimeout = o.sendTimeout ?? null;
    this.requestTimeout = o.requestTimeout ?? 30;
    this.syncHold = o.syncHold ?? 10;
    this.maxAuthFailures = o.maxAuthFailures === undefined ? 3 : o.maxAuthFailures;

    this.state = STATES.STOPPED;
    this.userId = null;
    this.connId = null;
    this.serverId = null;
    this.url = null;
    this.connections = 0;
    /** The transport of the current (or last) connection: "websocket", "sse" or "poll". */
    this.transport = null;

    this._running = false;
    this._ws = null;
    this._transportIndex = 0;
    this._reached = false; // a frame came on the current attempt (its transport works here)
    this._wsTransport = null;
    this._attempt = 0;
    this._urlIndex = 0;
    this._failures = 0;
    this._authFailures = 0;
    this._goingAway = false;
    this._lastError = null;
    this._currentToken = null;
    this._authReply = null;
    this._fatal = null;
    this._timers = new Map(); // name -> setTimeout handle
    this._lastRx = 0;
    this._readyWaiters = [];
    this._stopWaiters = [];
    this._outbox = new Map(); // clientMsgId -> {frame, waiters, sentOn, attempts, retry, timeout}
    this._inFlight = 0;
    this._requests = new Map(); // id -> {kind, frame, d, repeatable, sentOn, attempts, retry, timeout}
    this._requestNo = 0;
    this._requestPrefix = "q" + newClientMsgId().slice(0, 8) + ".";
    this._reads = new Map();
    this._readsUnsent = new Map();
    this._seen = new Set(); // insertion-ordered: oldest first
    this._inbox = [];
    this._queued = new Set();
    this._handling = false;
    this._held = null;
    this._acks = [];
    this._ackScheduled = false;
  }

  // --- life cycle ---------------------------------------------------------------

  /** Start connecting; resolves with the first auth_reply. */
  start() {
    if (!this._running) {
      this._running = true;
      this._fatal = null;
      this._scheduleAttempt(0);
    }
    return this.whenReady();
  }

  /** Resolves with the auth_reply of the current connection, or of the next one. */
  whenReady() {
    if (this.state === STATES.READY) return Promise.resolve(this._authReply);
    if (!this._running) return Promise.reject(this._fatal || new IMError("stopped", "the client is not started"));
    const d = deferred();
    this._readyWaiters.push(d);
    return d.promise;
  }

  /** Close and stop reconnecting; pending calls reject with code "stopped". */
  stop() {
    if (!this._running) return Promise.resolve();
    this._running = false;
    this._clearAllTimers();
    this._failPending(new IMError("stopped", "the client was stopped"));
    this._inbox = [];
    this._queued.clear();
    this._held = null;
    const ws = this._ws;
    if (!ws) {
      this._setState(STATES.STOPPED);
      return Promise.resolve();
    }
    this._flushAcks();
    const d = deferred();
    this._stopWaiters.push(d);
    try { ws.close(1000, "bye"); } catch { /* already closing */ }
    // a gateway that does not answer the close handshake: give up waiting
    this._timer("closing", this.connectTimeout, () => this._lost(ws, 1006, "close timeout"));
    return d.promise;
  }

  get ready() { return this.state === STATES.READY; }
  get running() { return this._running; }

  // --- the application's calls ---------------------------------------------------

  /** Send body to sessionId; resolves with the message_reply once stored. */
  send(sessionId, body, { clientMsgId } = {}) {
    if (!this._running) return Promise.reject(new IMError("stopped", "start() the client first"));
    if (typeof sessionId !== "string" || !sessionId) return Promise.reject(new TypeError("sessionId"));
    const cmid = clientMsgId || newClientMsgId();
    const d = deferred();
    let entry = this._outbox.get(cmid);
    if (entry) {
      entry.waiters.push(d);
      return d.promise;
    }
    const frame = { type: "message", clientMsgId: cmid, sessionId, body };
    const size = frameSize(frame);
    if (size > this.maxFrameSize) {
      // the gateway would close the socket (1009) and the message would come back after every
      // reconnect, holding back the ones after it: refuse it here, with the reason
      return Promise.reject(new IMError("too_large", `the message is ${size} bytes; the limit is ${this.maxFrameSize}`,
        { clientMsgId: cmid, size, limit: this.maxFrameSize }));
    }
    entry = { cmid, frame, size, waiters: [d], sentOn: null, attempts: 0, retry: null, timeout: null };
    this._outbox.set(cmid, entry);
    if (this.sendTimeout != null) {
      entry.timeout = setTimeout(() => this._sendTimedOut(cmid), this.sendTimeout * 1000);
    }
    this._pump();
    return d.promise;
  }

  /** A page of history (ascending seq): the limit newest with seq < beforeSeq. */
  history(sessionId, { beforeSeq = null, limit = null } = {}) {
    const frame = { type: "history", sessionId };
    if (beforeSeq != null) frame.beforeSeq = beforeSeq;
    if (limit != null) frame.limit = limit;
    return this._request("history", frame, true).then((reply) => reply.messages);
  }

  /** Create a group with members (the caller is always one); resolves with the session_reply. */
  createSession(members, { sessionId = null } = {}) {
    const frame = { type: "session_create", members: [...members] };
    if (sessionId != null) frame.sessionId = sessionId;
    return this._request("session_create", frame, false);
  }

  /** Recall one of this user's messages; resolves with the recall_reply (the event's msgId, seq). */
  recall(msgId) {
    return this._request("recall", { type: "recall", msgId }, false).then(okOrThrow);
  }

  /** Replace the body of one of this user's messages; resolves with the edit_reply. */
  edit(msgId, body) {
    return this._request("edit", { type: "edit", msgId, body }, false).then(okOrThrow);
  }

  /** Tell the session's other members this user is typing: at most once per typingInterval
   * seconds and session, only while connected (ephemeral). Returns true when a frame went out. */
  typing(sessionId) {
    if (this.state !== STATES.READY || !this._ws) return false;
    const now = Date.now();
    const last = this._typingSent.get(sessionId);
    if (last !== undefined && now - last < this.typingInterval * 1000) return false;
    this._typingSent.set(sessionId, now);
    if (this._typingSent.size > 1000) this._typingSent.clear();
    this._send({ type: "typing", sessionId });
    return true;
  }

  /** Follow the presence of users: resolves with the presence_reply; onPresence then gets every
   * change, also those a reconnect reveals (the subscription is made again on each connection). */
  subscribePresence(users) {
    const list = [...new Set(users)].filter((u) => typeof u === "string" && u);
    for (const u of list) this._presenceUsers.add(u);
    if (!list.length) return Promise.resolve({ type: "presence_reply", ok: true, users: [] });
    return this._request("presence", { type: "presence_subscribe", users: list }, true).then(okOrThrow);
  }

  /** Stop following users. */
  unsubscribePresence(users) {
    const list = [...new Set(users)].filter((u) => this._presenceUsers.has(u));
    for (const u of list) { this._presenceUsers.delete(u); this.presence.delete(u); }
    if (list.length && this.state === STATES.READY && this._ws) {
      this._send({ type: "presence_unsubscribe", id: this._requestPrefix + ++this._requestNo, users: list });
    }
  }

  /** Move this user's read cursor in sessionId to seq (never backwards; repeated after reconnects). */
  read(sessionId, seq) {
    if (!this._running) throw new IMError("stopped", "start() the client first");
    const known = Math.max(this._reads.get(sessionId) ?? -1, this._readsUnsent.get(sessionId) ?? -1);
    if (seq <= known) return;
    if (this.state === STATES.READY) {
      this._reads.set(sessionId, seq);
      this._send({ type: "read", sessionId, seq });
    } else {
      this._readsUnsent.set(sessionId, seq);
    }
  }

  // --- connecting ------------------------------------------------------------------

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    if (this.onState) {
      try { this.onState(state); } catch (e) { console.error("onState failed", e); }
    }
  }

  _timer(name, seconds, fn) {
    this._clearTimer(name);
    this._timers.set(name, setTimeout(() => { this._timers.delete(name); fn(); }, seconds * 1000));
  }

  _clearTimer(name) {
    if (this._timers.has(name)) {
      clearTimeout(this._timers.get(name));
      this._timers.delete(name);
    }
  }

  _clearAllTimers() {
    for (const name of [...this._timers.keys()]) this._clearTimer(name);
  }

  _scheduleAttempt(delay) {
    this._setState(delay > 0 ? STATES.WAITING : STATES.CONNECTING);
    this._timer("attempt", delay, () => this._connect());
  }

  _backoff() {
    this._failures += 1;
    const delay = Math.min(this.retryMax, this.retryInitial * 2 ** Math.min(this._failures - 1, 30));
    return delay * (0.5 + Math.random() / 2);
  }

  async _connect() {
    if (!this._running) return;
    const attempt = ++this._attempt;
    const url = this.urls[this._urlIndex % this.urls.length];
    this.url = url;
    this._goingAway = false;
    this._lastError = null;
    this._setState(STATES.CONNECTING);
    let token;
    try {
      token = this.getToken ? await this.getToken() : this.token;
      if (typeof token !== "string" || !token) throw new Error("getToken() gave no token");
    } catch (e) {
      if (attempt !== this._attempt || !this._running) return;
      this._urlIndex += 1;
      this._scheduleAttempt(this._backoff());
      return;
    }
    if (attempt !== this._attempt || !this._running) return;
    const transport = this.transports[this._transportIndex % this.transports.length];
    let ws;
    try {
      if (transport === "websocket") {
        ws = new this.WebSocket(url);
      } else {
        this.url = this.streamUrls[this._urlIndex % this.streamUrls.length];
        ws = new StreamSocket(this.url, {
          mode: transport, fetch: this.fetch, EventSource: this.EventSource, sseTimeout: this.sseTimeout,
          onmode: (mode) => { if (ws === this._ws) this._useTransport(mode, true); },
        });
      }
    } catch (e) {
      this._urlIndex += 1;
      this._scheduleAttempt(this._backoff());
      return;
    }
    this._ws = ws;
    this._reached = false;
    this._currentToken = token;
    this._timer("open", this.connectTimeout, () => this._abort(ws));
    this._wsTransport = transport;
    ws.onopen = () => {
      if (ws !== this._ws) return;
      this._clearTimer("open");
      this._lastRx = Date.now();
      this._setState(STATES.AUTHENTICATING);
      this._send(this._authFrame(token));
      this._timer("auth", this.authTimeout, () => this._abort(ws));
    };
    ws.onmessage = (event) => this._received(ws, event.data);
    ws.onclose = (event) => this._lost(ws, event.code, event.reason);
    ws.onerror = () => { /* onclose follows */ };
  }

  _useTransport(transport, sticky = false) {
    this._reached = true;
    const index = this.transports.indexOf(transport);
    if (index >= 0 && (sticky || index !== this._transportIndex)) this._transportIndex = index;
    if (transport === this.transport) return;
    this.transport = transport;
    if (this.onTransport) {
      try { this.onTransport(transport); } catch (e) { console.error("onTransport failed", e); }
    }
  }

  _abort(ws) {
    try { ws.close(); } catch { /* ignore */ }
    // a socket stuck in CONNECTING/CLOSING may not report close soon: treat it as lost now
    this._lost(ws, 1006, "aborted");
  }

  _authFrame(token) {
    const frame = { type: "auth", token };
    if (this.device != null) frame.device = this.device;
    return frame;
  }

  _send(frame) {
    const ws = this._ws;
    if (ws && ws.readyState === 1) ws.send(JSON.stringify(frame));
  }

  _lost(ws, code, reason) {
    if (ws !== this._ws) return;
    const wasReady = this.state === STATES.READY;
    this._ws = null;
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    for (const name of ["open", "auth", "ping", "pingCheck", "refresh", "hold", "closing"]) this._clearTimer(name);
    this._releaseHeld();
    if (code === 1009 || this._lastError === "too_large") this._refusedForSize(ws);
    this._requeue(ws);
    if (!this._running) {
      this._setState(this._fatal ? STATES.FAILED : STATES.STOPPED);
      const waiters = this._stopWaiters;
      this._stopWaiters = [];
      for (const d of waiters) d.resolve();
      return;
    }
    const authFailed = code === 4001 || code === 4002 || AUTH_CODES.has(this._lastError);
    if (!this._reached && this.transports.length > 1) {
      // this transport does not get through from here: the next one, at once (backoff once
      // every one of them failed)
      this._transportIndex = (this._transportIndex + 1) % this.transports.length;
      if (this._transportIndex !== 0) {
        this._scheduleAttempt(0);
        return;
      }
    }
    this._urlIndex += 1;
    if (this._lastError === "kicked") {
      // an operator threw the user out (POST /v1/users/{id}/kick): never come back on our own
      this._failFatal(new IMError("kicked", `an operator closed this user's connections (${reason || code})`));
      return;
    }
    if (authFailed) this._authFailures += 1;
    if (authFailed && (!this.getToken || (this.maxAuthFailures != null && this._authFailures >= this.maxAuthFailures))) {
      this._failFatal(new IMError(this._lastError || "invalid_token", `the gateway refused the token (${reason || code})`));
      return;
    }
    let delay;
    if (authFailed) delay = this._backoff();
    // a drained gateway's clients spread over a few seconds, not all at the same instant
    else if (this._goingAway || code === 1001) delay = Math.random() * this.goingAwaySpread;
    else if (wasReady) delay = Math.random() * this.retryInitial;
    else delay = this._backoff();
    this._scheduleAttempt(delay);
  }

  _refusedForSize(ws) {
    // the gateway closed the socket for a frame over its limit (below ours): the largest
    // unanswered one sent on it fails and is never sent again
    let largest = null;
    for (const x of [...this._outbox.values(), ...this._requests.values()]) {
      if (x.sentOn === ws && (!largest || x.size > largest.size)) largest = x;
    }
    if (!largest) return;
    this.maxFrameSize = Math.min(this.maxFrameSize, Math.max(1, largest.size - 1));
    const err = new IMError("too_large", `the gateway refused a frame of ${largest.size} bytes`,
      { size: largest.size, limit: this.maxFrameSize });
    if (largest.cmid !== undefined) {
      largest.sentOn = null;
      this._inFlight -= 1;
      err.clientMsgId = largest.cmid;
      this._finishMessage(largest.cmid, (d) => d.reject(err));
    } else {
      this._finishRequest(largest, (d) => d.reject(err));
    }
  }

  // --- frames ---------------------------------------------------------------------

  _received(ws, data) {
    if (ws !== this._ws) return;
    this._lastRx = Date.now();
    // the transport gets through once a frame arrives (a proxy may accept a WebSocket, then cut it)
    if (!this._reached) this._useTransport(ws instanceof StreamSocket ? ws.mode : this._wsTransport);
    let frame;
    try { frame = JSON.parse(data); } catch { return; }
    if (!frame || typeof frame !== "object" || Array.isArray(frame)) return;
    // a Map: a frame "type" such as "constructor" or "__proto__" names no handler
    const handler = typeof frame.type === "string" ? this._handlers.get(frame.type) : undefined;
    if (!handler) return;
    try { handler.call(this, frame); } catch (e) { console.error(`handling ${frame.type} failed`, e); }
  }

  get _handlers() {
    return HANDLERS;
  }

  _onAuthReply(frame) {
    if (frame.ok === true) {
      this._clearTimer("auth");
      const first = this.state === STATES.AUTHENTICATING;
      this.userId = frame.userId;
      this.connId = frame.connId;
      this.serverId = frame.serverId;
      this._authReply = frame;
      if (Number.isInteger(frame.maxFrameSize) && frame.maxFrameSize > 0) {
        this.maxFrameSize = Math.min(this.maxFrameSize, frame.maxFrameSize);
      }
      this._scheduleRefresh();
      if (!first) return;
      this._failures = 0;
      this._authFailures = 0;
      this.connections += 1;
      this._setState(STATES.READY);
      if (this.syncHold > 0) {
        this._held = new Map();
        this._timer("hold", this.syncHold, () => this._releaseHeld());
      }
      this._startPings();
      this._flushOnReady();
      const waiters = this._readyWaiters;
      this._readyWaiters = [];
      for (const d of waiters) d.resolve(frame);
      return;
    }
    const code = (frame.error && frame.error.code) || "invalid_token";
    this._lastError = code;
    if (!AUTH_CODES.has(code) && this._ws) this._abort(this._ws);
  }

  _onMessageReply(frame) {
    const entry = this._outbox.get(frame.clientMsgId);
    if (!entry || entry.sentOn === null) return;
    this._answerMessage(entry, frame);
  }

  _answerMessage(entry, frame) {
    entry.sentOn = null;
    this._inFlight -= 1;
    if (frame.ok === true) {
      this._finishMessage(entry.cmid, (d) => d.resolve(frame));
    } else {
      const error = frame.error && typeof frame.error === "object" ? frame.error : frame;
      const code = String(error.code || "unavailable");
      if (RETRY_CODES.has(code)) {
        entry.attempts += 1;
        const delay = Math.min(this.retryMax, this.retryInitial * 2 ** Math.min(entry.attempts - 1, 30));
        entry.retry = setTimeout(() => { entry.retry = null; this._pump(); }, delay * 1000);
      } else {
        const err = new IMError(code, String(error.message || ""), { clientMsgId: entry.cmid });
        this._finishMessage(entry.cmid, (d) => d.reject(err));
      }
    }
    this._pump();
  }

  _finishMessage(cmid, fire) {
    const entry = this._outbox.get(cmid);
    this._outbox.delete(cmid);
    if (entry.retry) clearTimeout(entry.retry);
    if (entry.timeout) clearTimeout(entry.timeout);
    for (const d of entry.waiters) fire(d);
  }

  _sendTimedOut(cmid) {
    const entry = this._outbox.get(cmid);
    if (!entry) return;
    entry.timeout = null;
    if (entry.sentOn !== null) {
      entry.sentOn = null;
      this._inFlight -= 1;
    }
    this._finishMessage(cmid, (d) => d.reject(new IMError("timeout", `no message_reply within ${this.sendTimeout}s`)));
    this._pump();
  }

  _onMessageSend(frame) {
    const msgId = frame.msgId;
    if (typeof msgId !== "string" || !msgId) return;
    if (this._seen.has(msgId)) {
      this._ack(msgId);
      return;
    }
    if (this._queued.has(msgId)) return;
    if (this._held) {
      if (!this._held.has(msgId)) this._held.set(msgId, frame);
      return;
    }
    this._queued.add(msgId);
    this._inbox.push(frame);
    this._drain();
  }

  _releaseHeld() {
    this._clearTimer("hold");
    const held = this._held;
    this._held = null;
    if (!held || !held.size) return;
    const frames = [...held.values()].sort((a, b) => {
      const sa = String(a.sessionId), sb = String(b.sessionId);
      if (sa !== sb) return compareBytes(sa, sb);
      return (a.seq || 0) - (b.seq || 0);
    });
    for (const frame of frames) {
      if (!this._queued.has(frame.msgId) && !this._seen.has(frame.msgId)) {
        this._queued.add(frame.msgId);
        this._inbox.push(frame);
      }
    }
    this._drain();
  }

  _onSyncDone(frame) {
    this._releaseHeld();
    if (this.onSyncDone) {
      try { this.onSyncDone(typeof frame.count === "number" ? frame.count : 0); } catch (e) { console.error(e); }
    }
  }

  _onReadReceipt(frame) {
    if (this.onReadReceipt) {
      try { this.onReadReceipt(frame); } catch (e) { console.error("onReadReceipt failed", e); }
    }
  }

  _onChangeReply(frame) {
    const request = this._findRequest(frame.id, frame.type === "recall_reply" ? "recall" : "edit", null);
    if (request) this._finishRequest(request, (d) => d.resolve(frame));
  }

  _onPresenceReply(frame) {
    if (frame.ok === true && Array.isArray(frame.users)) {
      for (const entry of frame.users) if (entry && typeof entry === "object") this._presenceChanged({ type: "presence", ...entry });
    }
    const request = typeof frame.id === "string" ? this._requests.get(frame.id) : undefined;
    if (request && request.kind === "presence") this._finishRequest(request, (d) => d.resolve(frame));
  }

  _presenceChanged(frame) {
    const user = frame.userId;
    if (typeof user !== "string" || !this._presenceUsers.has(user)) return;
    const online = frame.online === true;
    const known = this.presence.get(user);
    const { type, ...state } = frame;
    this.presence.set(user, { ...state, online });
    if (known && known.online === online) return; // a reconnect's reply repeating what was known
    this._call(this.onPresence, frame, "onPresence");
  }

  _call(callback, frame, name) {
    if (!callback) return;
    try { callback(frame); } catch (e) { console.error(`${name} failed`, e); }
  }

  _onHistoryReply(frame) {
    const request = this._findRequest(frame.id, "history", frame.sessionId);
    if (request) this._finishRequest(request, (d) => d.resolve(frame));
  }

  _onSessionReply(frame) {
    const request = this._findRequest(frame.id, "session_create", null);
    if (!request) return;
    if (frame.ok === true) this._finishRequest(request, (d) => d.resolve(frame));
    else {
      const e = frame.error || {};
      this._finishRequest(request, (d) => d.reject(new IMError(String(e.code || "bad_frame"), String(e.message || ""))));
    }
  }

  _onError(frame) {
    const code = String(frame.code || "");
    const ref = frame.ref;
    const entry = typeof ref === "string" ? this._outbox.get(ref) : undefined;
    if (entry && entry.sentOn !== null) {
      this._answerMessage(entry, { ok: false, error: frame });
      return;
    }
    const request = typeof ref === "string" ? this._requests.get(ref) : undefined;
    if (request && request.sentOn !== null) {
      if (RETRY_CODES.has(code) && request.repeatable) {
        request.sentOn = null;
        request.attempts += 1;
        const delay = Math.min(this.retryMax, this.retryInitial * 2 ** Math.min(request.attempts - 1, 30));
        request.retry = setTimeout(() => { request.retry = null; this._sendRequest(request); }, delay * 1000);
      } else {
        this._finishRequest(request, (d) => d.reject(new IMError(code || "bad_frame", String(frame.message || ""))));
      }
      return;
    }
    this._lastError = code;
    if (code === "going_away") this._goingAway = true;
  }

  // --- sending ------------------------------------------------------------------------

  _pump() {
    const ws = this._ws;
    if (this.state !== STATES.READY || !ws) return;
    for (const entry of this._outbox.values()) {
      if (this._inFlight >= this.maxInFlight) break;
      if (entry.sentOn !== null || entry.retry) continue;
      entry.sentOn = ws;
      this._inFlight += 1;
      this._send(entry.frame);
    }
  }

  _request(kind, frame, repeatable) {
    if (!this._running) return Promise.reject(new IMError("stopped", "start() the client first"));
    const id = this._requestPrefix + ++this._requestNo;
    frame.id = id;
    const size = frameSize(frame);
    if (size > this.maxFrameSize) {
      return Promise.reject(new IMError("too_large", `the ${frame.type} frame is ${size} bytes; the limit is ${this.maxFrameSize}`));
    }
    const d = deferred();
    const request = { id, kind, frame, size, d, repeatable, sentOn: null, attempts: 0, retry: null, timeout: null };
    this._requests.set(id, request);
    if (this.requestTimeout) {
      request.timeout = setTimeout(() => {
        request.timeout = null;
        this._finishRequest(request, (x) => x.reject(new IMError("timeout", `no answer to ${kind} within ${this.requestTimeout}s`)));
      }, this.requestTimeout * 1000);
    }
    this._sendRequest(request);
    return d.promise;
  }

  _sendRequest(request) {
    if (this.state === STATES.READY && this._ws && request.sentOn === null && this._requests.has(request.id)) {
      request.sentOn = this._ws;
      this._send(request.frame);
    }
  }

  _findRequest(id, kind, sessionId) {
    if (typeof id === "string" && this._requests.has(id)) {
      const request = this._requests.get(id);
      return request.kind === kind ? request : null;
    }
    for (const request of this._requests.values()) {
      if (request.kind === kind && request.sentOn !== null && (sessionId == null || request.frame.sessionId === sessionId)) {
        return request;
      }
    }
    return null;
  }

  _finishRequest(request, fire) {
    this._requests.delete(request.id);
    if (request.retry) clearTimeout(request.retry);
    if (request.timeout) clearTimeout(request.timeout);
    fire(request.d);
  }

  _flushOnReady() {
    this._flushAcks();
    const reads = new Map(this._readsUnsent);
    this._readsUnsent.clear();
    for (const [sessionId, seq] of this._reads) reads.set(sessionId, Math.max(seq, reads.get(sessionId) ?? -1));
    this._reads = new Map();
    for (const [sessionId, seq] of reads) {
      this._reads.set(sessionId, seq);
      this._send({ type: "read", sessionId, seq });
    }
    for (const request of this._requests.values()) if (!request.retry) this._sendRequest(request);
    if (this.connections > 1 && this._presenceUsers.size) {
      // subscriptions end with the connection: made again; the reply tells what changed meanwhile
      this._request("presence", { type: "presence_subscribe", users: [...this._presenceUsers].sort() }, true)
        .catch((e) => console.warn("presence_subscribe failed", e));
    }
    this._pump();
  }

  _requeue(ws) {
    for (const entry of this._outbox.values()) if (entry.sentOn === ws) entry.sentOn = null;
    this._inFlight = 0;
    for (const entry of this._outbox.values()) if (entry.sentOn !== null) this._inFlight += 1;
    for (const request of [...this._requests.values()]) {
      if (request.sentOn === ws) {
        request.sentOn = null;
        if (!request.repeatable) {
          this._finishRequest(request, (d) => d.reject(new IMError("disconnected", `the connection dropped before the ${request.kind} reply`)));
        }
      }
    }
  }

  // --- receiving --------------------------------------------------------------------------

  _drain() {
    while (this._inbox.length && !this._handling && this._running) {
      const frame = this._inbox.shift();
      this._handling = true;
      let result;
      try {
        result = this.onMessage ? this.onMessage(frame) : undefined;
      } catch (e) {
        this._handlerFailed(frame, e);
        continue;
      }
      if (result && typeof result.then === "function") {
        result.then(() => { this._handled(frame); this._drain(); },
          (e) => { this._handlerFailed(frame, e); this._drain(); });
        return;
      }
      this._handled(frame);
    }
  }

  _handled(frame) {
    this._handling = false;
    this._queued.delete(frame.msgId);
    this._seen.add(frame.msgId);
    while (this._seen.size > this.dedupSize) this._seen.delete(this._seen.values().next().value);
    this._ack(frame.msgId);
  }

  _handlerFailed(frame, e) {
    this._handling = false;
    this._queued.delete(frame.msgId);
    console.error(`onMessage failed for ${frame.msgId}; it comes again with the next sync`, e);
  }

  _ack(msgId) {
    this._acks.push(msgId);
    if (!this._ackScheduled && this._running) {
      this._ackScheduled = true;
      // coalesce: one message_send_reply for everything handled in this turn
      Promise.resolve().then(() => { this._ackScheduled = false; this._flushAcks(); });
    }
  }

  _flushAcks() {
    if (this.state !== STATES.READY || !this._ws || !this._acks.length) return;
    const acks = this._acks;
    this._acks = [];
    for (let i = 0; i < acks.length; i += ACK_CHUNK) {
      this._send({ type: "message_send_reply", msgIds: acks.slice(i, i + ACK_CHUNK) });
    }
  }

  // --- keepalive and refresh --------------------------------------------------------------

  _startPings() {
    if (this.pingInterval > 0) this._timer("ping", this.pingInterval, () => this._ping());
  }

  _ping() {
    const ws = this._ws;
    if (!ws || this.state !== STATES.READY) return;
    const sentAt = Date.now();
    this._send({ type: "ping" });
    this._timer("pingCheck", this.pingTimeout, () => {
      if (ws === this._ws && this._lastRx < sentAt) this._abort(ws);
    });
    this._timer("ping", this.pingInterval, () => this._ping());
  }

  _scheduleRefresh() {
    this._clearTimer("refresh");
    if (!this.getToken || !this._currentToken) return;
    const exp = tokenExpiry(this._currentToken);
    if (exp == null) return;
    const delay = Math.max(1, exp - Date.now() / 1000 - this.refreshMargin);
    this._timer("refresh", delay, () => this._refresh());
  }

  async _refresh() {
    const ws = this._ws;
    if (!ws || this.state !== STATES.READY) return;
    try {
      const token = await this.getToken();
      if (ws === this._ws && this.state === STATES.READY && typeof token === "string" && token) {
        this._currentToken = token;
        this._send(this._authFrame(token));
      }
    } catch {
      if (ws === this._ws) this._timer("refresh", this._backoff(), () => this._refresh());
    }
  }

  // --- stopping -------------------------------------------------------------------------

  _failPending(err) {
    for (const cmid of [...this._outbox.keys()]) this._finishMessage(cmid, (d) => d.reject(err));
    this._inFlight = 0;
    for (const request of [...this._requests.values()]) this._finishRequest(request, (d) => d.reject(err));
    this._reads.clear();
    this._readsUnsent.clear();
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const d of waiters) d.reject(err);
  }

  _failFatal(err) {
    this._fatal = err;
    this._running = false;
    this._clearAllTimers();
    this._failPending(err);
    this._inbox = [];
    this._queued.clear();
    this._held = null;
    this._setState(STATES.FAILED);
    if (this._ws) this._abort(this._ws);
  }
}

// PROTOCOL.md orders sync by sessionId in byte order: compare UTF-8, not UTF-16 units
function compareBytes(a, b) {
  const ea = new TextEncoder().encode(a), eb = new TextEncoder().encode(b);
  const n = Math.min(ea.length, eb.length);
  for (let i = 0; i < n; i++) if (ea[i] !== eb[i]) return ea[i] - eb[i];
  return ea.length - eb.length;
}

const HANDLERS = new Map([
  ["auth_reply", IMClient.prototype._onAuthReply],
  ["message_reply", IMClient.prototype._onMessageReply],
  ["message_send", IMClient.prototype._onMessageSend],
  ["sync_done", IMClient.prototype._onSyncDone],
  ["read_receipt", IMClient.prototype._onReadReceipt],
  ["history_reply", IMClient.prototype._onHistoryReply],
  ["session_reply", IMClient.prototype._onSessionReply],
  ["error", IMClient.prototype._onError],
  ["pong", () => {}],
  ["recall_reply", IMClient.prototype._onChangeReply],
  ["edit_reply", IMClient.prototype._onChangeReply],
  ["presence_reply", IMClient.prototype._onPresenceReply],
  ["presence", function (frame) { this._presenceChanged(frame); }],
  ["typing", function (frame) { this._call(this.onTyping, frame, "onTyping"); }],
  ["delivery_receipt", function (frame) { this._call(this.onDeliveryReceipt, frame, "onDeliveryReceipt"); }],
]);

function okOrThrow(reply) {
  if (reply && reply.ok === false) {
    const e = reply.error || {};
    throw new IMError(String(e.code || "bad_frame"), String(e.message || ""));
  }
  return reply;
}
