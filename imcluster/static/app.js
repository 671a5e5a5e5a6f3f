// The imcluster web chat: log in, list sessions with unread counts, open a 1:1 or a group,
// read history, send and receive live, see sent/delivered/read state, recall and edit one's
// messages, see who is typing and who is online (live), membership notices. Talks to imapi
// (this page's origin: /v1/...) and to the gateways over WebSocket (imcluster.js).
import { DEFAULT_MAX_FRAME_SIZE, IMClient, frameSize, isEvent, p2pSessionId } from "./imcluster.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const LOGIN_KEY = "imcluster.login";       // sessionStorage: one login per tab, kept across reloads
const CURRENT_KEY = "imcluster.current";
const HISTORY_PAGE = 50;
const SESSIONS_REFRESH = 30_000;
const PRESENCE_REFRESH = 15_000;   // only for a server without live presence (version 1)
const TYPING_SHOWN = 4_000;        // "typing..." stays this long after the last typing frame
const RUN_GAP = 5 * 60_000;        // a run of bubbles: same sender, at most 5 minutes apart
const COLLAPSE_CHARS = 700;        // longer messages are collapsed, with "Show more"
const COLLAPSE_LINES = 12;
const PRESENCE_MAX = 500;          // the server's default presence_max

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
  online: new Map(),      // userId -> true/false (live presence)
  livePresence: null,     // null: not known yet, true: the server pushes presence, false: poll
  typing: new Map(),      // sessionId -> Map(userId -> until ms)
  expanded: new Set(),    // message keys whose "show more" was opened
  menu: null,             // the key of the message whose menu is open
  editing: null,          // {sessionId, key, msgId} while the composer edits a message
  connState: "connecting",
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

function names(users) {
  return users.map((u) => (u === state.login.userId ? "you" : u)).join(", ");
}

// what an event shows as (a notice line; never a bubble); null for recall/edit, which change
// the message they refer to instead
function noticeText(m) {
  if (m.kind === "members") {
    const body = m.body && typeof m.body === "object" ? m.body : {};
    const added = Array.isArray(body.added) ? body.added.filter((u) => typeof u === "string") : [];
    const removed = Array.isArray(body.removed) ? body.removed.filter((u) => typeof u === "string") : [];
    const parts = [];
    if (added.length) parts.push(`added ${names(added)}`);
    if (removed.length) parts.push(`removed ${names(removed)}`);
    const who = m.from === state.login.userId ? "You" : m.from;
    return `${who} ${parts.join(" and ") || "changed the members"}`;
  }
  if (m.kind === "recall" || m.kind === "edit") return null;
  return null;  // an unknown kind: not shown (a later version's event)
}

function previewOf(m) {
  if (!isEvent(m)) return m.recalled ? "Message recalled" : bodyText(m.body);
  if (m.kind === "recall") return `${m.from === state.login.userId ? "You" : m.from} recalled a message`;
  if (m.kind === "edit") return bodyText(m.body);
  return noticeText(m) || "";
}

function dayLabel(ts) {
  const d = new Date(ts);
  const today = new Date();
  const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (d.toDateString() === today.toDateString()) return "Today";
  if (d.toDateString() === yesterday.toDateString()) return "Yesterday";
  const sameYear = d.getFullYear() === today.getFullYear();
  return d.toLocaleDateString([], { weekday: "short", day: "numeric", month: "short", ...(sameYear ? {} : { year: "numeric" }) });
}

function maxFrameSize() {
  const n = state.config.maxFrameSize;
  return Number.isInteger(n) && n > 0 ? n : DEFAULT_MAX_FRAME_SIZE;
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
  state.online.clear();
  state.typing.clear();
  state.livePresence = null;
  state.editing = null;
  state.menu = null;
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
    maxFrameSize: maxFrameSize(),
    onMessage,
    onReadReceipt,
    onTyping,
    onPresence,
    onDeliveryReceipt,
    onState: (s) => {
      const text = { ready: "online", waiting: "reconnecting…", authenticating: "connecting…",
        connecting: "connecting…", failed: "disconnected", stopped: "disconnected" }[s] || s;
      const badge = $("conn-state");
      badge.dataset.state = s;
      badge.textContent = text;
      // the conversation pane says it too: on a phone the list (and its badge) is hidden
      state.connState = s;
      // peers' online dots are last known states while one's own connection is down: hide them
      document.body.dataset.conn = s;
      const banner = $("conv-conn");
      banner.dataset.state = s;
      banner.hidden = s === "ready";
      if (state.current) renderSub();
      banner.textContent = s === "ready" ? "" : { waiting: "Connection lost · reconnecting…",
        connecting: "Connecting…", authenticating: "Connecting…", failed: "Disconnected",
        stopped: "Disconnected" }[s] || s;
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
  // a version 1 server has no live presence: the page then asks imapi now and then
  state.timers.push(setInterval(() => { if (state.livePresence === false) refreshPresence(); }, PRESENCE_REFRESH));
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
      // the server's count covers every entry up to its lastSeq: a delivery (the sync after
      // logging in, racing with this answer) at or below it is already counted
      s.countedSeq = Math.max(s.countedSeq || 0, row.lastSeq);
      s.activity = s.activity || row.lastSeq;  // replaced by the last message's time once known
    }
  } catch (e) {
    console.warn("cannot list sessions", e);
  }
  renderSessions();
  fillInSessions();
  followPresence();
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
          s.preview = previewOf(last);
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
    const avatar = makeAvatar(s.sessionId, title);
    const main = el("span", "s-main");
    const typing = typingUsers(s.sessionId);
    const last = typing.length
      ? el("span", "s-last typing-now", s.kind === "p2p" ? "typing…" : `${typing.join(", ")} typing…`)
      : el("span", "s-last", s.preview || (s.kind === "group" ? "group" : ""));
    main.append(el("span", "s-name", title), last);
    button.append(avatar, main);
    if (s.unread > 0) button.append(el("span", "badge", String(s.unread)));
    button.addEventListener("click", () => openSession(s.sessionId));
    li.append(button);
    list.append(li);
  }
  $("no-sessions").hidden = rows.length > 0;
}

// a 1:1 avatar: a circle with the peer's initial and a live online dot; a group's: a rounded
// square with up to two members' initials and a people mark, so the two never look alike
function makeAvatar(sessionId, title) {
  const peer = peerOf(sessionId);
  if (peer) {
    const avatar = el("span", "avatar", peer.slice(0, 1));
    avatar.style.background = `hsl(${hue(peer)} 55% 48%)`;
    const online = state.online.get(peer);
    if (online !== undefined) {
      const dot = el("span", `dot ${online ? "on" : "off"}`);
      dot.title = online ? "online" : "offline";
      avatar.append(dot);
    }
    return avatar;
  }
  const avatar = el("span", "avatar group");
  avatar.style.background = `hsl(${hue(sessionId)} 40% 42%)`;
  const members = (state.members.get(sessionId) || []).filter((u) => u !== state.login.userId);
  const initials = members.length ? members.slice(0, 2).map((u) => u.slice(0, 1)).join("") : title.slice(0, 1);
  avatar.append(el("span", "initials", initials));
  const size = (state.members.get(sessionId) || []).length;
  if (size) avatar.append(el("span", "count", String(size)));
  avatar.title = size ? `group of ${size}` : "group";
  return avatar;
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

// an event of the session (PROTOCOL.md 1.1): recall and edit change the message they refer to;
// members events become a notice line. Never a bubble, never unread.
function applyEvent(sessionId, m) {
  const messages = messagesOf(sessionId);
  if (m.kind === "recall" || m.kind === "edit") {
    const key = `m:${m.ref}`;
    const target = messages.get(key);
    if (target) {
      if (m.kind === "recall") messages.set(key, { ...target, recalled: true, body: null });
      else if (!target.recalled) messages.set(key, { ...target, body: m.body, edited: true });
    }
    if (state.editing && state.editing.msgId === m.ref && m.kind === "recall") cancelEdit();
    return;
  }
  if (m.kind === "members") {
    messages.set(`m:${m.msgId}`, { ...m, sessionId, notice: noticeText(m) });
    const body = m.body && typeof m.body === "object" ? m.body : {};
    const members = state.members.get(sessionId);
    if (members) {
      const removed = new Set(Array.isArray(body.removed) ? body.removed : []);
      const next = members.filter((u) => !removed.has(u));
      for (const u of Array.isArray(body.added) ? body.added : []) if (!next.includes(u)) next.push(u);
      state.members.set(sessionId, next);
    }
  }
}

async function openSession(sessionId) {
  state.current = sessionId;
  sessionStorage.setItem(CURRENT_KEY, sessionId);
  session(sessionId);
  if (state.editing && state.editing.sessionId !== sessionId) cancelEdit();
  state.menu = null;
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
    for (const m of page) if (!isEvent(m)) upsert(sessionId, { ...m, sessionId, status: "sent" });
    // events after the messages they change (a page may hold an edit of an older page's message:
    // the server already shows that one's latest state)
    for (const m of page) if (isEvent(m)) applyEvent(sessionId, { ...m, sessionId });
    const seqs = page.map((m) => m.seq);
    state.oldest.set(sessionId, page.length < HISTORY_PAGE ? null : Math.min(...seqs));
    const s = session(sessionId);
    if (page.length) {
      s.lastSeq = Math.max(s.lastSeq, ...seqs);
      if (beforeSeq == null) {
        s.preview = previewOf(page[page.length - 1]);
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
  if (message.status === "failed") return { text: `Not sent: ${message.error}`, cls: "failed" };
  if (message.seq == null) return { text: "sending…", cls: "sending" };
  const receipts = state.receipts.get(message.sessionId) || new Map();
  const readers = [...receipts]
    .filter(([user, seq]) => user !== state.login.userId && seq >= message.seq).map(([user]) => user);
  if (readers.length) {
    const text = message.sessionId.startsWith("p2p:") ? "✓✓ Read" : `✓✓ Read by ${readers.join(", ")}`;
    return { text, cls: "read" };
  }
  // 1:1: the other phone acknowledged it (history's "delivered", or a delivery_receipt)
  if (message.delivered === true && message.sessionId.startsWith("p2p:")) return { text: "✓✓ Delivered", cls: "delivered" };
  return { text: "✓ Sent", cls: "sent" };
}

function tooLong(message) {
  const text = bodyText(message.body);
  return text.length > COLLAPSE_CHARS || text.split("\n").length > COLLAPSE_LINES;
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
    $("conv-avatar").replaceChildren();
    list.replaceChildren();
    $("older").hidden = true;
    renderTyping();
    return;
  }
  $("conv-title").textContent = titleOf(sessionId);
  $("conv-avatar").replaceChildren(makeAvatar(sessionId, titleOf(sessionId)));
  renderSub();
  renderTyping();
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const fromBottom = box.scrollHeight - box.scrollTop;
  const group = !sessionId.startsWith("p2p:");
  const rows = [...messagesOf(sessionId).entries()]
    .sort(([, a], [, b]) => (a.seq ?? Infinity) - (b.seq ?? Infinity) || (a.ts || 0) - (b.ts || 0));
  const items = [];
  let previous = null;  // the previous bubble (null after a notice or a date line)
  let day = null;
  for (let i = 0; i < rows.length; i++) {
    const [key, m] = rows[i];
    const ts = typeof m.ts === "number" ? m.ts : Date.now();
    const thisDay = new Date(ts).toDateString();
    if (thisDay !== day) {
      day = thisDay;
      items.push(el("li", "day", dayLabel(ts)));
      previous = null;
    }
    if (m.notice !== undefined || isEvent(m)) {
      if (m.notice) items.push(el("li", "notice", m.notice));
      previous = null;
      continue;
    }
    const mine = m.from === state.login.userId;
    // the next bubble of the same run (same sender, a few minutes apart, same day): time and
    // marks show on the last bubble of a run only
    const after = i + 1 < rows.length ? rows[i + 1][1] : null;
    const next = after && after.notice === undefined && !isEvent(after) ? after : null;
    const continues = next && next.from === m.from && (next.ts || 0) - ts < RUN_GAP
      && new Date(next.ts || Date.now()).toDateString() === thisDay;
    const startsRun = !previous || previous.from !== m.from || ts - (previous.ts || 0) >= RUN_GAP;
    const li = el("li", mine ? "msg mine" : "msg");
    if (!continues) li.classList.add("last");
    if (m.msgId) li.dataset.msgId = m.msgId;
    if (m.seq != null) li.dataset.seq = String(m.seq);
    if (group && !mine && startsRun) li.append(el("span", "from", m.from));
    const row = el("div", "row");
    const bubble = el("div", "bubble");
    if (m.recalled) {
      bubble.classList.add("recalled");
      bubble.textContent = mine ? "You recalled this message" : "This message was recalled";
      li.dataset.recalled = "true";
    } else {
      const text = bodyText(m.body);
      const collapsed = tooLong(m) && !state.expanded.has(key);
      const span = el("span", "text", collapsed ? text.slice(0, COLLAPSE_CHARS).split("\n").slice(0, COLLAPSE_LINES).join("\n") + "…" : text);
      bubble.append(span);
      if (tooLong(m)) {
        const more = el("button", "link more", collapsed ? "Show more" : "Show less");
        more.type = "button";
        more.addEventListener("click", () => {
          if (state.expanded.has(key)) state.expanded.delete(key);
          else state.expanded.add(key);
          renderConversation("keep-position");
        });
        bubble.append(more);
        li.dataset.collapsed = String(collapsed);
      }
      if (m.edited) {
        bubble.append(el("span", "edited", " (edited)"));
        li.dataset.edited = "true";
      }
    }
    row.append(bubble);
    if (mine && m.msgId && !m.recalled) row.append(messageMenu(key, m));
    li.append(row);
    const st = mine ? statusOf(m) : null;
    if (st) li.dataset.status = st.cls;
    // a pending or failed message always says so; otherwise only the last of a run has a footer
    if (!continues || (st && (st.cls === "failed" || st.cls === "sending"))) {
      const meta = el("span", "meta", clock(m.ts));
      if (st) meta.append(el("span", `status ${st.cls}`, ` · ${st.text}`));
      li.append(meta);
    }
    items.push(li);
    previous = m;
  }
  list.replaceChildren(...items);
  $("older").hidden = state.oldest.get(sessionId) == null;
  if (scroll === "keep") box.scrollTop = box.scrollHeight - fromBottom;
  else if (scroll === "bottom" || (atBottom && scroll !== "keep-position")) box.scrollTop = box.scrollHeight;
}

// the "⋯" menu of one of my messages: Edit (text messages) and Recall
function messageMenu(key, m) {
  const wrap = el("div", "menu-wrap");
  const button = el("button", "menu-button", "⋯");
  button.type = "button";
  button.title = "Message actions";
  button.setAttribute("aria-label", "Message actions");
  button.setAttribute("aria-haspopup", "menu");
  button.addEventListener("click", (e) => {
    e.stopPropagation();
    state.menu = state.menu === key ? null : key;
    renderConversation("keep-position");
  });
  wrap.append(button);
  if (state.menu === key) {
    button.classList.add("open");
    button.setAttribute("aria-expanded", "true");
    const menu = el("div", "menu");
    menu.setAttribute("role", "menu");
    if (m.body && typeof m.body === "object" && typeof m.body.text === "string") {
      const edit = el("button", "menu-item", "Edit");
      edit.type = "button";
      edit.dataset.action = "edit";
      edit.addEventListener("click", (e) => { e.stopPropagation(); startEdit(key, m); });
      menu.append(edit);
    }
    const recall = el("button", "menu-item danger", "Recall");
    recall.type = "button";
    recall.dataset.action = "recall";
    recall.addEventListener("click", (e) => { e.stopPropagation(); recallMessage(key, m); });
    menu.append(recall);
    wrap.append(menu);
  }
  return wrap;
}

function composerError(text) {
  const e = $("composer-error");
  e.textContent = text;
  e.hidden = !text;
}

async function recallMessage(key, m) {
  state.menu = null;
  renderConversation("keep-position");
  try {
    await state.client.recall(m.msgId);
    const messages = messagesOf(m.sessionId);
    const current = messages.get(key);
    if (current) messages.set(key, { ...current, recalled: true, body: null });
    if (state.editing && state.editing.key === key) cancelEdit();
    if (m.sessionId === state.current) renderConversation("keep-position");
  } catch (e) {
    composerError(e.code === "not_allowed" ? "This message can no longer be recalled." : `Cannot recall: ${e.message}`);
  }
}

function startEdit(key, m) {
  state.menu = null;
  state.editing = { sessionId: m.sessionId, key, msgId: m.msgId };
  $("editing").hidden = false;
  $("composer").classList.add("editing");
  const input = $("text");
  input.value = bodyText(m.body);
  autosize();
  input.focus();
  renderConversation("keep-position");
}

function cancelEdit() {
  state.editing = null;
  $("editing").hidden = true;
  $("composer").classList.remove("editing");
  $("text").value = "";
  autosize();
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

// --- presence and typing ----------------------------------------------------------------------

// the header's second line: the peer's live presence ("typing…" while typing), or a group's members
function renderSub() {
  const sessionId = state.current;
  if (!sessionId) return;
  const peer = peerOf(sessionId);
  const sub = $("conv-sub");
  const typing = typingUsers(sessionId);
  if (peer && state.connState !== "ready") {
    // one's own connection is down: the peer's last known state would be a guess
    sub.textContent = "";
    delete sub.dataset.presence;
  } else if (peer && typing.length) {
    sub.textContent = "typing…";
    sub.dataset.presence = "typing";
  } else if (peer && state.online.has(peer)) {
    sub.textContent = state.online.get(peer) ? "online" : "offline";
    sub.dataset.presence = state.online.get(peer) ? "online" : "offline";
  } else {
    sub.textContent = state.presence;
    delete sub.dataset.presence;
  }
}

function typingUsers(sessionId) {
  const now = Date.now();
  const typing = state.typing.get(sessionId);
  if (!typing) return [];
  for (const [user, until] of typing) if (until <= now) typing.delete(user);
  return [...typing.keys()];
}

// the "typing..." line above the composer
function renderTyping() {
  const line = $("typing");
  const users = state.current ? typingUsers(state.current) : [];
  line.hidden = users.length === 0;
  if (!users.length) {
    line.textContent = "";
    return;
  }
  const who = state.current.startsWith("p2p:") ? users[0] : users.join(", ");
  line.textContent = `${who} ${users.length > 1 ? "are" : "is"} typing…`;
}

function onTyping(t) {
  if (typeof t.sessionId !== "string" || typeof t.userId !== "string" || t.userId === state.login.userId) return;
  let typing = state.typing.get(t.sessionId);
  if (!typing) state.typing.set(t.sessionId, (typing = new Map()));
  const fresh = !typing.has(t.userId);
  typing.set(t.userId, Date.now() + TYPING_SHOWN);
  if (t.sessionId === state.current) {
    renderTyping();
    renderSub();
    setTimeout(() => { if (t.sessionId === state.current) { renderTyping(); renderSub(); } }, TYPING_SHOWN + 50);
  }
  if (fresh) renderSessions();  // the list says "typing…" too
  setTimeout(() => { if (!typingUsers(t.sessionId).includes(t.userId)) renderSessions(); }, TYPING_SHOWN + 50);
}

function stopTyping(sessionId, userId) {
  const typing = state.typing.get(sessionId);
  if (typing && typing.delete(userId) && sessionId === state.current) {
    renderTyping();
    renderSub();
  }
}  // (the caller renders the list)

function onPresence(p) {
  if (typeof p.userId !== "string") return;
  state.online.set(p.userId, p.online === true);
  renderSessions();
  if (state.current && peerOf(state.current) === p.userId) {
    renderSub();
    $("conv-avatar").replaceChildren(makeAvatar(state.current, titleOf(state.current)));
  }
}

// live presence of the users this page shows: the peers of the 1:1 sessions in the list
async function followPresence() {
  if (!state.client || state.livePresence === false) return;
  const peers = new Set();
  for (const s of state.sessions.values()) {
    const peer = peerOf(s.sessionId);
    if (peer) peers.add(peer);
  }
  const wanted = [...peers].slice(0, PRESENCE_MAX).filter((u) => !state.client.presence.has(u));
  if (!wanted.length) return;
  try {
    await state.client.subscribePresence(wanted);
    state.livePresence = true;
  } catch (e) {
    if (e.code === "bad_frame" || e.code === "timeout") {
      state.livePresence = false;  // a version 1 server: imapi is asked (refreshPresence)
      refreshPresence();
    } else {
      console.warn("presence_subscribe failed", e);
    }
  }
}

async function refreshPresence() {
  const sessionId = state.current;
  if (!sessionId) return;
  const peer = peerOf(sessionId);
  try {
    if (peer) {
      if (state.livePresence !== false) {
        followPresence();
        return;
      }
      const p = await api(`/v1/users/${encodeURIComponent(peer)}/presence`);
      state.online.set(peer, p.online === true);
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
    renderSub();
    $("conv-title").textContent = titleOf(sessionId);
    $("conv-avatar").replaceChildren(makeAvatar(sessionId, titleOf(sessionId)));
  }
}

// --- sending ---------------------------------------------------------------------------------

function send(event) {
  event.preventDefault();
  const input = $("text");
  const text = input.value.trim();
  const sessionId = state.current;
  if (!text || !sessionId) return;
  if (state.editing) {
    saveEdit(text);
    return;
  }
  const clientMsgId = crypto.randomUUID ? crypto.randomUUID().replace(/-/g, "") : String(Math.random()).slice(2);
  // measured before anything is sent: a frame over the gateway's limit would close the socket
  // and be sent again after every reconnect; the text stays in the box, with the reason
  const size = frameSize({ type: "message", clientMsgId, sessionId, body: { text } });
  if (size > state.client.maxFrameSize) {
    composerError(`This message is too long to send (${text.length.toLocaleString()} characters, `
      + `${size.toLocaleString()} bytes; the limit is ${state.client.maxFrameSize.toLocaleString()} bytes). `
      + "Shorten it or split it in parts.");
    return;
  }
  composerError("");
  input.value = "";
  autosize();
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
      s.countedSeq = Math.max(s.countedSeq || 0, reply.seq);
      if (sessionId === state.current) renderConversation();
    },
    (e) => {
      const why = e.code === "too_large" ? "too long for the server" : (e.code || e.message);
      upsert(sessionId, { clientMsgId, from: state.login.userId, status: "failed", error: why });
      if (sessionId === state.current) renderConversation();
    });
}

async function saveEdit(text) {
  const { sessionId, key, msgId } = state.editing;
  const body = { text };
  const size = frameSize({ type: "edit", id: "q00000000.0000", msgId, body });
  if (size > state.client.maxFrameSize) {
    composerError(`Too long to save (${size.toLocaleString()} bytes; the limit is ${state.client.maxFrameSize.toLocaleString()}).`);
    return;
  }
  try {
    await state.client.edit(msgId, body);
    const messages = messagesOf(sessionId);
    const current = messages.get(key);
    if (current) messages.set(key, { ...current, body, edited: true });
    composerError("");
    cancelEdit();
    if (sessionId === state.current) renderConversation("keep-position");
  } catch (e) {
    composerError(e.code === "not_allowed" ? "This message can no longer be edited." : `Cannot edit: ${e.message}`);
  }
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
  s.preview = previewOf(m);
  s.activity = Date.now();
  const mine = m.from === state.login.userId;  // sent from another device of mine
  const event = isEvent(m);
  if (state.messages.has(m.sessionId) || m.sessionId === state.current) {
    if (event) applyEvent(m.sessionId, m);
    else upsert(m.sessionId, { ...m, status: "sent" });
  }
  if (!event) stopTyping(m.sessionId, m.from);  // the message that was being typed
  // events never count as unread; nor does what the server's count (loadSessions) covers
  const counted = typeof m.seq === "number" && m.seq <= (s.countedSeq || 0);
  if (typeof m.seq === "number") s.countedSeq = Math.max(s.countedSeq || 0, m.seq);
  if (m.sessionId === state.current) {
    renderConversation();
    markRead();
  } else if (!mine && !event && !counted) {
    s.unread += 1;
  }
  renderSessions();
  if (!known) {
    fillInSessions();  // a new conversation: its members (for a group's name)
    followPresence();  // and, for a 1:1, the peer's presence
  }
}

function onDeliveryReceipt(r) {
  if (typeof r.sessionId !== "string" || !Array.isArray(r.msgIds)) return;
  const messages = state.messages.get(r.sessionId);
  if (!messages) return;
  let changed = false;
  for (const id of r.msgIds) {
    const m = messages.get(`m:${id}`);
    if (m && !m.delivered) {
      messages.set(`m:${id}`, { ...m, delivered: true });
      changed = true;
    }
  }
  if (changed && r.sessionId === state.current) renderConversation();
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
    if (state.editing) cancelEdit();
    composerError("");
    state.current = null;
    sessionStorage.removeItem(CURRENT_KEY);
    renderSessions();
    renderConversation();
  });
  $("older").addEventListener("click", () => loadHistory(state.current, state.oldest.get(state.current)));
  $("text").addEventListener("input", () => {
    autosize();
    // "typing..." for the others: imcluster.js sends at most one a second
    if (state.current && state.client && !state.editing && $("text").value.trim()) state.client.typing(state.current);
  });
  $("cancel-edit").addEventListener("click", () => { cancelEdit(); composerError(""); });
  document.addEventListener("click", () => {
    if (state.menu !== null) {
      state.menu = null;
      renderConversation("keep-position");
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.editing) { cancelEdit(); composerError(""); }
  });
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
