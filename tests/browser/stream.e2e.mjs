// The web chat where WebSocket is blocked: Playwright (playwright-core) drives Debian's Chromium.
//
// alice's browser cannot open a WebSocket (every one is routed to fail, as a proxy that breaks
// them would): her page falls back to Server-Sent Events by itself and says so. bob is on
// WebSocket on another gateway. They talk both ways; alice goes offline while bob writes and gets
// it when she is back; alice closes her page, bob writes, her new page gets it by sync; she
// reloads and finds history and read state. carol's browser also loses its event streams (a proxy
// that buffers them): her page moves on to long polling. Run by tests/test_browser.py:
//
//   IMTEST_APP_URL=http://127.0.0.1:8090/app/ IMTEST_WS_A=ws://.../ws IMTEST_WS_B=ws://.../ws \
//   IMTEST_STREAM_A=http://127.0.0.1:8082 IMTEST_ARTIFACTS=/tmp/artifacts node stream.e2e.mjs
//
// Exit status 0 when every step passed; screenshots are left in IMTEST_ARTIFACTS.
import { mkdirSync } from "node:fs";
import { join } from "node:path";

import { chromium } from "playwright-core";

const APP = process.env.IMTEST_APP_URL;
const WS_A = process.env.IMTEST_WS_A;
const WS_B = process.env.IMTEST_WS_B;
const STREAM_A = process.env.IMTEST_STREAM_A;
const ARTIFACTS = process.env.IMTEST_ARTIFACTS || "artifacts";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const WAIT = Number(process.env.IMTEST_BROWSER_WAIT || 15000);

if (!APP || !WS_A || !WS_B || !STREAM_A) {
  console.error("set IMTEST_APP_URL, IMTEST_WS_A, IMTEST_WS_B and IMTEST_STREAM_A");
  process.exit(2);
}
mkdirSync(ARTIFACTS, { recursive: true });

const problems = [];
let step = "launch";

function check(condition, what) {
  if (!condition) throw new Error(`${step}: ${what}`);
}

function url(ws, stream) {
  const q = new URLSearchParams({ ws });
  if (stream) q.set("stream", stream);
  return `${APP}?${q}`;
}

async function login(page, user, ws, stream, transport) {
  await page.goto(url(ws, stream));
  await page.locator("#login-user").fill(user);
  await page.locator("#login-submit").click();
  await ready(page, transport);
  check((await page.locator("#me-name").textContent()) === user, `logged in as ${user}`);
}

async function ready(page, transport) {
  await page.locator("#conn-state[data-state=ready]").waitFor({ timeout: WAIT });
  await page.locator(`#conn-transport[data-transport=${transport}]`).waitFor({ timeout: WAIT });
}

async function say(page, text) {
  await page.locator("#text").fill(text);
  await page.locator("#text").press("Enter");
}

function message(page, text) {
  return page.locator(".msg", { hasText: text });
}

function watch(name, page) {
  page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
  page.on("console", (m) => {
    // the blocked WebSocket, and the event streams cut on carol's side, are reported by Chromium itself
    if (m.type() === "error" && !/WebSocket|EventSource|ERR_FAILED|net::/.test(m.text())) {
      problems.push(`${name}: console: ${m.text()}`);
    }
  });
}

// a proxy that breaks WebSocket: every one the page opens is closed at once
async function blockWebSocket(context) {
  let blocked = 0;
  await context.routeWebSocket(/.*/, (ws) => { blocked += 1; ws.close({ code: 1006, reason: "blocked" }); });
  return () => blocked;
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync"],
});

try {
  const desktop = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const phone = await browser.newContext({ viewport: { width: 390, height: 760 }, deviceScaleFactor: 2,
    isMobile: true, hasTouch: true });
  const blockedA = await blockWebSocket(desktop);
  let alice = await desktop.newPage();
  const bob = await phone.newPage();
  watch("alice", alice);
  watch("bob", bob);

  step = "alice's WebSocket is blocked: her page falls back to SSE and says so; bob is on WebSocket";
  await login(alice, "alice", WS_A, STREAM_A, "sse");
  check(blockedA() >= 1, "the page tried WebSocket first");
  check((await alice.locator("#conn-transport").textContent()) === "SSE", "the page shows SSE");
  await login(bob, "bob", WS_B, null, "websocket");

  step = "alice writes to bob through SSE's POST; bob answers and alice gets it on her event stream";
  await alice.locator("#new-members").fill("bob");
  await alice.locator("#new-members").press("Enter");
  await alice.locator("#conv-title", { hasText: "bob" }).waitFor({ timeout: WAIT });
  await say(alice, "Hello Bob, over Server-Sent Events");
  await message(alice, "over Server-Sent Events").and(alice.locator("[data-status=sent], [data-status=delivered], [data-status=read]"))
    .waitFor({ timeout: WAIT });
  const row = bob.locator('#sessions li[data-session="p2p:alice:bob"]');
  await row.locator(".badge", { hasText: "1" }).waitFor({ timeout: WAIT });
  await row.locator("button").click();
  await message(bob, "over Server-Sent Events").waitFor({ timeout: WAIT });
  await say(bob, "Hi Alice, over WebSocket");
  await message(alice, "Hi Alice, over WebSocket").waitFor({ timeout: WAIT });
  await message(alice, "over Server-Sent Events").and(alice.locator("[data-status=read]")).waitFor({ timeout: WAIT });
  await message(bob, "Hi Alice, over WebSocket").and(bob.locator("[data-status=read]")).waitFor({ timeout: WAIT });

  step = "alice goes offline while bob writes; back online, she gets it";
  await desktop.setOffline(true);
  await say(bob, "Written while you were offline");
  await message(bob, "Written while you were offline").and(bob.locator("[data-status=sent], [data-status=delivered], [data-status=read]"))
    .waitFor({ timeout: WAIT });
  await new Promise((resolve) => setTimeout(resolve, 2000));
  await desktop.setOffline(false);
  await message(alice, "Written while you were offline").waitFor({ timeout: WAIT });

  step = "alice closes her page; bob writes; her next page gets it by sync";
  await alice.close();
  await say(bob, "Written while your page was closed");
  await message(bob, "Written while your page was closed").and(bob.locator("[data-status=sent]"))
    .waitFor({ timeout: WAIT });
  alice = await desktop.newPage();
  watch("alice", alice);
  await login(alice, "alice", WS_A, STREAM_A, "sse");
  const back = alice.locator('#sessions li[data-session="p2p:alice:bob"]');
  await back.locator("button").click();
  await message(alice, "Written while your page was closed").waitFor({ timeout: WAIT });
  await message(bob, "Written while your page was closed").and(bob.locator("[data-status=read]"))
    .waitFor({ timeout: WAIT });

  step = "alice reloads: SSE again, history and read state are there";
  await alice.reload();
  await ready(alice, "sse");
  await message(alice, "over Server-Sent Events").waitFor({ timeout: WAIT });
  await message(alice, "Written while your page was closed").waitFor({ timeout: WAIT });
  await message(alice, "over Server-Sent Events").and(alice.locator("[data-status=read]"))
    .waitFor({ timeout: WAIT });
  await say(alice, "Back after a reload, still over SSE");
  await message(bob, "Back after a reload, still over SSE").waitFor({ timeout: WAIT });

  step = "carol's proxy breaks WebSocket and buffers event streams: her page moves on to long polling";
  const carolContext = await browser.newContext({ viewport: { width: 390, height: 760 }, deviceScaleFactor: 2,
    isMobile: true, hasTouch: true });
  await blockWebSocket(carolContext);
  // an event stream that never delivers a byte: the request is held until the page gives up on it
  const held = [];
  await carolContext.route(/\/stream\/[^/?]+$/, (route) => {
    if (route.request().method() === "GET") held.push(route);
    else route.continue();
  });
  const carol = await carolContext.newPage();
  watch("carol", carol);
  await login(carol, "carol", WS_A, STREAM_A, "poll");
  check(held.length >= 1, "the page tried an event stream first");
  check((await carol.locator("#conn-transport").textContent()) === "long polling", "the page shows long polling");
  await carol.locator("#new-members").fill("alice");
  await carol.locator("#new-members").press("Enter");
  await carol.locator("#conv-title", { hasText: "alice" }).waitFor({ timeout: WAIT });
  await say(carol, "Hi Alice, I am long polling");
  await alice.locator('#sessions li[data-session="p2p:alice:carol"] button').click();
  await message(alice, "I am long polling").waitFor({ timeout: WAIT });
  await say(alice, "Got it, Carol");
  await message(carol, "Got it, Carol").waitFor({ timeout: WAIT });

  step = "screenshots";
  await alice.locator('#sessions li[data-session="p2p:alice:bob"] button').click();
  await message(alice, "Back after a reload").waitFor({ timeout: WAIT });
  await alice.screenshot({ path: join(ARTIFACTS, "stream-desktop.png") });
  await carol.screenshot({ path: join(ARTIFACTS, "poll-phone.png") });
  await carol.locator("#back").click();
  await carol.locator("#conn-transport", { hasText: "long polling" }).waitFor({ timeout: WAIT });
  await carol.screenshot({ path: join(ARTIFACTS, "poll-phone-list.png") });
  for (const route of held) route.abort().catch(() => {});
  check(problems.length === 0, `no page errors: ${problems.join("; ")}`);
  console.log("browser chat over the HTTP streaming transport: all steps passed");
  console.log("1 passed, 0 failed");
} catch (e) {
  console.error(`FAILED at "${step}": ${e.message}`);
  for (const p of problems) console.error(p);
  try {
    for (const context of browser.contexts()) {
      for (const [i, page] of context.pages().entries()) {
        await page.screenshot({ path: join(ARTIFACTS, `stream-failure-${browser.contexts().indexOf(context)}-${i}.png`) });
      }
    }
  } catch { /* the browser may be gone */ }
  process.exitCode = 1;
} finally {
  await browser.close();
}
