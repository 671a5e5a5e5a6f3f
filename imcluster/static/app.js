// The imcluster web chat: log in, list sessions with unread counts, open a 1:1 or a group,
// read history, send and receive live, see sent/read state. Talks to imapi (this page's
// origin: /v1/...) and to the gateways over WebSocket (imcluster.js).
import { IMClient, p2pSessionId } from "./imcluster.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const LOGIN_KEY = "imcluster.login";       // sessionStorage: one login per tab, kept across reloads
const CURRENT_KEY = "imcluster.current";
const HISTORY_PAGE = 50;
const SESSIONS_REFRESH = 30_000;
const PRESENCE_REFRESH = 15_000;

const state = {
  config: { wsUrls: [], streamUrls: [], devLogin: false },
  login: null,            // {userId, token, dev}
  client: null,
  sessions: new Map(),    // sessionId -> {sessionId, kind, lastSeq, unread, preview, activity}
  messages: new Map(),    // sessionId -> Map(key -> message)
  oldest: new Map(),      // sessionId -> lowest seq loaded (null: nothing earlier)
  members: new Map(),     // sessionId -> [userId]
  receipts: new Map(),    // sessionId -> Map(userId -> seq), kept in localStorage
  current: null,
  presence: "",
  timers: [],
};

// --- small helpers --------------------------------------------------------------------

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function bodyText(body) {
  if (body && typeof body === "object" && typeof body.text === "string") return body.text;
  return JSON.stringify(body);
}

function clock(ts) {
  if (typeof ts !== "number") return "";
  return new Date(ts).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function hue(text) {
  let h = 0;
  for (const ch of text) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function peerOf(sessionId) {
  if (!sessionId.startsWith("p2p:")) return null;
  const [, a, b] = sessionId.split(":");
  return a === state.login.userId ? b : a;
}

function titleOf(sessionId) {
  const peer = peerOf(sessionId);
  if (peer) return peer;
  const members = state.members.get(sessionId);
  if (members) return members.filter((u) => u !== state.login.userId).join(", ") || "just you";
  return /^[0-9a-f]{32}$/.test(sessionId) ? `Group ${sessionId.slice(0, 6)}` : sessionId;
}

function tokenSubject(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4))).sub || null;
  } catch {
    return null;
  }
}

// --- HTTP API --------------------------------------------------------------------------

async function devToken(userId) {
  const r = await fetch("/v1/dev/login", {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ userId }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error ? body.error.message : `login failed (${r.status})`);
  return body.token;
}

async function api(path, retried = false) {
  const r = await fetch(path, { headers: { authorization: `Bearer ${state.login.token}` } });
  const body = await r.json().catch(() => ({}));
  if (r.status === 401 && state.login.dev && !retried) {
    state.login.token = await devToken(state.login.userId);
    saveLogin();
    return api(path, true);
  }
  if (!r.ok) {
    const e = new Error(body.error ? body.error.message : `HTTP ${r.status}`);
    e.status = r.status;
    throw e;
  }
  return body;
}

// --- login -----------------------------------------------------------------------------

function saveLogin() {
  sessionStorage.setItem(LOGIN_KEY, JSON.stringify(state.login));
}

function showLogin(message = "") {
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("dev-login").hidden = !state.config.devLogin;
  $("login-user").required = state.config.devLogin;
  if (!state.config.devLogin) $("token-login").open = true;
  (state.config.devLogin ? $("login-user") : $("login-token")).focus();
}

async function onLogin(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  $("login-submit").disabled = true;
  try {
    const pasted = $("login-token").value.trim();
    if (pasted) {
      const userId = tokenSubject(pasted);
      if (!userId) throw new Error("that is not a JWT with a 'sub'");
      state.login = { userId, token: pasted, dev: false };
    } else {
      const userId = $("login-user").value.trim();
      state.login = { userId, token: await devToken(userId), dev: true };
    }
    saveLogin();
    await start();
  } catch (e) {
    showLogin(e.message);
  } finally {
    $("login-submit").disabled = false;
  }
}

function logout(message = "") {
  if (state.client) state.client.stop();
  state.client = null;
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  sessionStorage.removeItem(LOGIN_KEY);
  sessionStorage.removeItem(CURRENT_KEY);
  state.sessions.clear();
  state.messages.clear();
  state.oldest.clear();
  state.current = null;
  showLogin(message);
}

// --- connection ---------------------------------------------------------------------------

function gatewayUrls() {
  const chosen = params.getAll("ws");
  if (chosen.length) return chosen;
  const urls = state.config.wsUrls;
  // spread browsers over the gateways: start at a random one, fail over to the next
  const first = Math.floor(Math.random() * urls.length);
  return urls.slice(first).concat(urls.slice(0, first));
}

function streamUrls() {
  // ?stream=http://host:8082 (repeatable) picks the HTTP streaming endpoints, as ?ws= the gateways
  const chosen = params.getAll("stream");
  return chosen.length ? chosen : (state.config.streamUrls || []);
}

const TRANSPORT_NAMES = { websocket: "WebSocket", sse: "SSE", poll: "long polling" };

async function start() {
  const login = state.login;
  $("login").hidden = true;
  $("app").hidden = false;
  $("me-name").textContent = login.userId;
  loadReceipts();
  const client = new IMClient({
    urls: gatewayUrls(),
    streamUrls: streamUrls(),
    onTransport: (t) => {
      const badge = $("conn-transport");
      badge.dataset.transport = t;
      badge.textContent = TRANSPORT_NAMES[t] || t;
    },
    device: `web ${navigator.platform || ""}`.trim().slice(0, 64),
    getToken: async () => {
      if (login.dev) {
        login.token = await devToken(login.userId);
        saveLogin();
      }
      return login.token;
    },
    onMessage,
    onReadReceipt,
    onState: (s) => {
      const badge = $("conn-state");
      badge.dataset.state = s;
      badge.textContent = { ready: "online", waiting: "reconnecting…", authenticating: "connecting…",
        connecting: "connecting…", failed: "disconnected", stopped: "disconnected" }[s] || s;
    },
  });
  state.client = client;
  try {
    await client.start();
  } catch (e) {
    if (state.client === client) logout(`Login refused: ${e.message}`);
    return;
  }
  await loadSessions();
  state.timers.push(setInterval(loadSessions, SESSIONS_REFRESH));
  state.timers.push(setInterval(refreshPresence, PRESENCE_REFRESH));
  const last = sessionStorage.getItem(CURRENT_KEY);
  if (last) openSession(last);
  else renderConversation();
}

// --- sessions ------------------------------------------------------------------------------

function session(sessionId) {
  let s = state.sessions.get(sessionId);
  if (!s) {
    s = { sessionId, kind: sessionId.startsWith("p2p:") ? "p2p" : "group", lastSeq: 0, unread: 0,
      preview: "", activity: 0 };
    state.sessions.set(sessionId, s);
  }
  return s;
}

async function loadSessions() {
  if (!state.login) return;
  try {
    const { sessions } = await api(`/v1/users/${encodeURIComponent(state.login.userId)}/sessions`);
    for (const row of sessions) {
      const s = session(row.sessionId);
      s.kind = row.kind;
      s.lastSeq = Math.max(s.lastSeq, row.lastSeq);
      // the open conversation is read as it arrives; the server may not have our read yet
      s.unread = row.sessionId === state.current && document.visibilityState === "visible" ? 0 : row.unread;
      s.activity = s.activity || row.lastSeq;  // replaced by the last message's time once known
    }
  } catch (e) {
    console.warn("cannot list sessions", e);
  }
  renderSessions();
  fillInSessions();
}

// what the list shows beyond the API's answer: the last message, and a group's members
async function fillInSessions() {
  const missing = [...state.sessions.values()].filter((s) => !s.filled).slice(0, 30);
  await Promise.all(missing.map(async (s) => {
    s.filled = true;
    try {
      if (s.kind === "group" && !state.members.has(s.sessionId)) {
        state.members.set(s.sessionId, (await api(`/v1/sessions/${encodeURIComponent(s.sessionId)}`)).members);
      }
      if (!s.preview && s.lastSeq > 0) {
        const [last] = await state.client.history(s.sessionId, { limit: 1 });
        if (last && !s.preview) {
          s.preview = bodyText(last.body);
          s.activity = Math.max(s.activity, last.ts);
        }
      }
    } catch (e) {
      s.filled = false;
    }
  }));
  if (missing.length) renderSessions();
}

function renderSessions() {
  const list = $("sessions");
  list.replaceChildren();
  const rows = [...state.sessions.values()].sort((a, b) => b.activity - a.activity || b.lastSeq - a.lastSeq);
  for (const s of rows) {
    const li = el("li");
    li.dataset.session = s.sessionId;
    if (s.sessionId === state.current) li.classList.add("active");
    const button = el("button");
    button.type = "button";
    const title = titleOf(s.sessionId);
    const avatar = el("span", "avatar", title.slice(0, 1));
    avatar.style.background = `hsl(${hue(s.sessionId)} 55% 48%)`;
    const main = el("span", "s-main");
    main.append(el("span", "s-name", title), el("span", "s-last", s.preview || (s.kind === "group" ? "group" : "")));
    button.append(avatar, main);
    if (s.unread > 0) button.append(el("span", "badge", String(s.unread)));
    button.addEventListener("click", () => openSession(s.sessionId));
    li.append(button);
    list.append(li);
  }
  $("no-sessions").hidden = rows.length > 0;
}

async function onNewChat(event) {
  event.preventDefault();
  const users = $("new-members").value.split(/[\s,]+/).filter((u) => u && u !== state.login.userId);
  if (!users.length) return;
  $("new-members").value = "";
  if (users.length === 1) {
    openSession(p2pSessionId(state.login.userId, users[0]));
    return;
  }
  try {
    const reply = await state.client.createSession(users);
    state.members.set(reply.sessionId, reply.members);
    const s = session(reply.sessionId);
    s.activity = Date.now();
    s.filled = true;
    openSession(reply.sessionId);
  } catch (e) {
    alert(`Cannot create the group: ${e.message}`);
  }
}

// --- the open conversation ---------------------------------------------------------------

function messagesOf(sessionId) {
  let m = state.messages.get(sessionId);
  if (!m) {
    m = new Map();
    state.messages.set(sessionId, m);
  }
  return m;
}

// one entry per message: keyed by msgId, except my own before the server answered (clientMsgId)
function upsert(sessionId, message) {
  const m = messagesOf(sessionId);
  const mineKey = message.from === state.login.userId && message.clientMsgId ? `c:${message.clientMsgId}` : null;
  if (mineKey && m.has(mineKey)) {
    const pending = m.get(mineKey);
    m.delete(mineKey);
    if (message.msgId) m.set(`m:${message.msgId}`, { ...pending, ...message, status: "sent" });
    else m.set(mineKey, { ...pending, ...message });
    return;
  }
  const key = message.msgId ? `m:${message.msgId}` : mineKey;
  m.set(key, { ...(m.get(key) || {}), ...message });
}

async function openSession(sessionId) {
  state.current = sessionId;
  sessionStorage.setItem(CURRENT_KEY, sessionId);
  session(sessionId);
  $("app").classList.add("in-conversation");
  renderSessions();
  renderConversation("bottom");
  $("text").focus();
  refreshPresence();
  if (!state.oldest.has(sessionId)) await loadHistory(sessionId, null);
  markRead();
}

async function loadHistory(sessionId, beforeSeq) {
  try {
    const page = await state.client.history(sessionId, { beforeSeq, limit: HISTORY_PAGE });
    for (const m of page) upsert(sessionId, { ...m, sessionId, status: "sent" });
    const seqs = page.map((m) => m.seq);
    state.oldest.set(sessionId, page.length < HISTORY_PAGE ? null : Math.min(...seqs));
    const s = session(sessionId);
    if (page.length) {
      s.lastSeq = Math.max(s.lastSeq, ...seqs);
      if (beforeSeq == null) {
        s.preview = bodyText(page[page.length - 1].body);
        s.activity = Math.max(s.activity, page[page.length - 1].ts);
      }
    }
  } catch (e) {
    // a 1:1 session exists once its first message is sent
    state.oldest.set(sessionId, null);
    if (e.code !== "no_session") console.warn("history failed", e);
  }
  if (sessionId === state.current) renderConversation(beforeSeq != null ? "keep" : "bottom");
  renderSessions();
}

function statusOf(message) {
  if (message.status === "failed") return { text: `not sent (${message.error})`, cls: "failed" };
  if (message.seq == null) return { text: "sending…", cls: "sending" };
  const receipts = state.receipts.get(message.sessionId) || new Map();
  const readers = [...receipts]
    .filter(([user, seq]) => user !== state.login.userId && seq >= message.seq).map(([user]) => user);
  if (readers.length) {
    const text = message.sessionId.startsWith("p2p:") ? "✓✓ Read" : `✓✓ Read by ${readers.join(", ")}`;
    return { text, cls: "read" };
  }
  return { text: "✓ Sent", cls: "sent" };
}

// scroll: "keep" (older messages added above), "bottom" (jump to the newest), or
// "auto" (follow new messages only when already at the bottom)
function renderConversation(scroll = "auto") {
  const sessionId = state.current;
  const box = $("messages");
  const list = $("message-list");
  $("pick").hidden = Boolean(sessionId);
  $("composer").hidden = !sessionId;
  if (!sessionId) {
    $("conv-title").textContent = "";
    $("conv-sub").textContent = "";
    list.replaceChildren();
    $("older").hidden = true;
    return;
  }
  $("conv-title").textContent = titleOf(sessionId);
  $("conv-sub").textContent = state.presence;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const fromBottom = box.scrollHeight - box.scrollTop;
  const group = !sessionId.startsWith("p2p:");
  const rows = [...messagesOf(sessionId).values()]
    .sort((a, b) => (a.seq ?? Infinity) - (b.seq ?? Infinity) || (a.ts || 0) - (b.ts || 0));
  const items = [];
  let previous = null;
  for (const m of rows) {
    const mine = m.from === state.login.userId;
    const li = el("li", mine ? "msg mine" : "msg");
    if (m.msgId) li.dataset.msgId = m.msgId;
    if (m.seq != null) li.dataset.seq = String(m.seq);
    if (group && !mine && previous !== m.from) li.append(el("span", "from", m.from));
    li.append(el("div", "bubble", bodyText(m.body)));
    const meta = el("span", "meta", clock(m.ts));
    if (mine) {
      const st = statusOf(m);
      const status = el("span", `status ${st.cls}`, ` · ${st.text}`);
      li.dataset.status = st.cls;
      meta.append(status);
    }
    li.append(meta);
    items.push(li);
    previous = m.from;
  }
  list.replaceChildren(...items);
  $("older").hidden = state.oldest.get(sessionId) == null;
  if (scroll === "keep") box.scrollTop = box.scrollHeight - fromBottom;
  else if (scroll === "bottom" || atBottom) box.scrollTop = box.scrollHeight;
}

function markRead() {
  const sessionId = state.current;
  if (!sessionId || document.visibilityState !== "visible" || !state.client) return;
  const seqs = [...messagesOf(sessionId).values()].map((m) => m.seq).filter((s) => typeof s === "number");
  if (seqs.length) state.client.read(sessionId, Math.max(...seqs));
  const s = session(sessionId);
  if (s.unread) {
    s.unread = 0;
    renderSessions();
  }
}

async function refreshPresence() {
  const sessionId = state.current;
  if (!sessionId) return;
  const peer = peerOf(sessionId);
  try {
    if (peer) {
      const p = await api(`/v1/users/${encodeURIComponent(peer)}/presence`);
      state.presence = p.online ? "online" : "offline";
    } else {
      let members = state.members.get(sessionId);
      if (!members) {
        members = (await api(`/v1/sessions/${encodeURIComponent(sessionId)}`)).members;
        state.members.set(sessionId, members);
      }
      state.presence = `${members.length} members: ${members.join(", ")}`;
    }
  } catch {
    state.presence = "";
  }
  if (sessionId === state.current) {
    $("conv-sub").textContent = state.presence;
    $("conv-title").textContent = titleOf(sessionId);
  }
}

// --- sending ---------------------------------------------------------------------------------

function send(event) {
  event.preventDefault();
  const input = $("text");
  const text = input.value.trim();
  const sessionId = state.current;
  if (!text || !sessionId) return;
  input.value = "";
  autosize();
  const clientMsgId = crypto.randomUUID ? crypto.randomUUID().replace(/-/g, "") : String(Math.random()).slice(2);
  const mine = { clientMsgId, sessionId, from: state.login.userId, body: { text }, ts: Date.now(), status: "sending" };
  upsert(sessionId, mine);
  const s = session(sessionId);
  s.preview = text;
  s.activity = Date.now();
  renderConversation("bottom");
  renderSessions();
  state.client.send(sessionId, { text }, { clientMsgId }).then(
    (reply) => {
      upsert(sessionId, { clientMsgId, from: state.login.userId, msgId: reply.msgId, seq: reply.seq, ts: reply.ts });
      s.lastSeq = Math.max(s.lastSeq, reply.seq);
      if (sessionId === state.current) renderConversation();
    },
    (e) => {
      upsert(sessionId, { clientMsgId, from: state.login.userId, status: "failed", error: e.code || e.message });
      if (sessionId === state.current) renderConversation();
    });
}

function autosize() {
  const t = $("text");
  t.style.height = "auto";
  t.style.height = `${Math.min(t.scrollHeight, 160)}px`;
}

// --- live events -----------------------------------------------------------------------------

function onMessage(m) {
  const known = state.sessions.has(m.sessionId);
  const s = session(m.sessionId);
  s.lastSeq = Math.max(s.lastSeq, m.seq);
  s.preview = bodyText(m.body);
  s.activity = Date.now();
  const mine = m.from === state.login.userId;  // sent from another device of mine
  if (state.messages.has(m.sessionId) || m.sessionId === state.current) {
    upsert(m.sessionId, { ...m, status: "sent" });
  }
  if (m.sessionId === state.current) {
    renderConversation();
    markRead();
  } else if (!mine) {
    s.unread += 1;
  }
  renderSessions();
  if (!known) fillInSessions();  // a new conversation: its members (for a group's name)
}

// Ids are keys of Maps, never of plain objects: a session or user named "__proto__" (any id
// another user may choose) must not reach Object.prototype. Stored as {sessionId: {userId: seq}}:
// JSON.parse and Object.fromEntries make own properties, whatever the name.
function loadReceipts() {
  state.receipts = new Map();
  try {
    const saved = JSON.parse(localStorage.getItem(`imcluster.receipts.${state.login.userId}`) || "{}");
    for (const [sessionId, cursors] of Object.entries(saved || {})) {
      if (!cursors || typeof cursors !== "object") continue;
      const m = new Map();
      for (const [userId, seq] of Object.entries(cursors)) if (typeof seq === "number") m.set(userId, seq);
      state.receipts.set(sessionId, m);
    }
  } catch {
    state.receipts = new Map();
  }
}

function saveReceipts() {
  const plain = Object.fromEntries([...state.receipts].map(([s, m]) => [s, Object.fromEntries(m)]));
  localStorage.setItem(`imcluster.receipts.${state.login.userId}`, JSON.stringify(plain));
}

function onReadReceipt(r) {
  if (typeof r.sessionId !== "string" || typeof r.userId !== "string" || typeof r.seq !== "number") return;
  let receipts = state.receipts.get(r.sessionId);
  if (!receipts) state.receipts.set(r.sessionId, (receipts = new Map()));
  if ((receipts.get(r.userId) ?? -1) >= r.seq) return;
  receipts.set(r.userId, r.seq);
  // remembered across reloads: the server sends a receipt once, when the cursor moves
  saveReceipts();
  if (r.userId === state.login.userId) {
    const s = session(r.sessionId);
    if (r.seq >= s.lastSeq && s.unread) {
      s.unread = 0;  // read on another device
      renderSessions();
    }
  }
  if (r.sessionId === state.current) renderConversation();
}

// --- wiring ------------------------------------------------------------------------------------

async function boot() {
  $("login-form").addEventListener("submit", onLogin);
  $("logout").addEventListener("click", () => logout());
  $("new-chat").addEventListener("submit", onNewChat);
  $("composer").addEventListener("submit", send);
  $("back").addEventListener("click", () => {
    $("app").classList.remove("in-conversation");
    state.current = null;
    sessionStorage.removeItem(CURRENT_KEY);
    renderSessions();
    renderConversation();
  });
  $("older").addEventListener("click", () => loadHistory(state.current, state.oldest.get(state.current)));
  $("text").addEventListener("input", autosize);
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") {
      markRead();
      loadSessions();
    }
  });
  try {
    state.config = await (await fetch("config.json")).json();
  } catch {
    state.config = { wsUrls: [`ws://${location.hostname}:8080/ws`], streamUrls: [`http://${location.hostname}:8082`],
      devLogin: false };
  }
  const saved = sessionStorage.getItem(LOGIN_KEY);
  if (saved) {
    state.login = JSON.parse(saved);
    start();
  } else {
    showLogin();
  }
}

boot();
