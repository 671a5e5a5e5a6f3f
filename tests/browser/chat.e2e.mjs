// The web chat in a real browser: Playwright (playwright-core) drives Debian's Chromium.
//
// Two users in two browser contexts, each connected to a different gateway, talk both
// ways; one reloads and finds the history and the other's read receipt. Run by
// tests/test_browser.py against a real cluster:
//
//   IMTEST_APP_URL=http://127.0.0.1:8090/app/ IMTEST_WS_A=ws://.../ws IMTEST_WS_B=ws://.../ws \
//   IMTEST_ARTIFACTS=/tmp/artifacts node chat.e2e.mjs
//
// Exit status 0 when every step passed; screenshots are left in IMTEST_ARTIFACTS.
import { mkdirSync } from "node:fs";
import { join } from "node:path";

import { chromium } from "playwright-core";

const APP = process.env.IMTEST_APP_URL;
const WS_A = process.env.IMTEST_WS_A;
const WS_B = process.env.IMTEST_WS_B;
const ARTIFACTS = process.env.IMTEST_ARTIFACTS || "artifacts";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const WAIT = Number(process.env.IMTEST_BROWSER_WAIT || 10000);

if (!APP || !WS_A || !WS_B) {
  console.error("set IMTEST_APP_URL, IMTEST_WS_A and IMTEST_WS_B");
  process.exit(2);
}
mkdirSync(ARTIFACTS, { recursive: true });

const problems = [];
let step = "launch";

function check(condition, what) {
  if (!condition) throw new Error(`${step}: ${what}`);
}

async function login(page, user, ws) {
  await page.goto(`${APP}?ws=${encodeURIComponent(ws)}`);
  await page.locator("#login-user").fill(user);
  await page.locator("#login-submit").click();
  await page.locator("#conn-state[data-state=ready]").waitFor({ timeout: WAIT });
  check((await page.locator("#me-name").textContent()) === user, `logged in as ${user}`);
}

async function say(page, text) {
  await page.locator("#text").fill(text);
  await page.locator("#text").press("Enter");
}

function message(page, text) {
  return page.locator(".msg", { hasText: text });
}

// launch() gives Chromium a fresh temporary profile (--user-data-dir) of its own
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
  const alice = await desktop.newPage();
  const bob = await phone.newPage();
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
    page.on("console", (m) => { if (m.type() === "error") problems.push(`${name}: console: ${m.text()}`); });
  }

  step = "log in on two gateways";
  await login(alice, "alice", WS_A);
  await login(bob, "bob", WS_B);

  step = "alice opens a 1:1 chat with bob and sends";
  await alice.locator("#new-members").fill("bob");
  await alice.locator("#new-members").press("Enter");
  await alice.locator("#conv-title", { hasText: "bob" }).waitFor({ timeout: WAIT });
  await say(alice, "Hello Bob — über gateway A");
  await message(alice, "Hello Bob").and(alice.locator("[data-status=sent], [data-status=delivered], [data-status=read]"))
    .waitFor({ timeout: WAIT });

  step = "bob sees the new conversation with 1 unread, opens it, answers";
  const row = bob.locator('#sessions li[data-session="p2p:alice:bob"]');
  await row.locator(".badge", { hasText: "1" }).waitFor({ timeout: WAIT });
  await row.locator("button").click();
  await message(bob, "Hello Bob — über").waitFor({ timeout: WAIT });
  await say(bob, "Hi Alice! Reading you on gateway B.");

  step = "alice receives bob's answer live and sees her message read";
  await message(alice, "Hi Alice!").waitFor({ timeout: WAIT });
  await message(alice, "Hello Bob").and(alice.locator("[data-status=read]")).waitFor({ timeout: WAIT });
  step = "bob sees his answer read (alice has the conversation open)";
  await message(bob, "Hi Alice!").and(bob.locator("[data-status=read]")).waitFor({ timeout: WAIT });

  step = "a group: alice creates it, bob gets it with an unread count";
  await alice.locator("#new-members").fill("bob, carol");
  await alice.locator("#new-members").press("Enter");
  await alice.locator("#conv-sub", { hasText: "3 members" }).waitFor({ timeout: WAIT });
  await say(alice, "Team, welcome to the group");
  await message(alice, "Team, welcome").and(alice.locator("[data-status=sent]")).waitFor({ timeout: WAIT });
  await bob.locator("#back").click();
  const group = bob.locator("#sessions li", { hasText: "Team, welcome" });
  await group.locator(".badge", { hasText: "1" }).waitFor({ timeout: WAIT });

  step = "alice goes back to bob and reloads: history and bob's read receipt are there";
  await alice.locator('#sessions li[data-session="p2p:alice:bob"] button').click();
  await message(alice, "Hi Alice!").waitFor({ timeout: WAIT });
  await alice.reload();
  await alice.locator("#conn-state[data-state=ready]").waitFor({ timeout: WAIT });
  await message(alice, "Hello Bob — über").waitFor({ timeout: WAIT });
  await message(alice, "Hi Alice!").waitFor({ timeout: WAIT });
  await message(alice, "Hello Bob").and(alice.locator("[data-status=read]")).waitFor({ timeout: WAIT });
  const mine = await alice.locator(".msg.mine .status").first().textContent();
  check(mine.includes("Read"), `her message shows as read (${mine})`);

  step = "bob opens the group and alice's group message shows who read it";
  await group.locator("button").click();
  await message(bob, "Team, welcome").waitFor({ timeout: WAIT });
  await bob.locator("#back").click();
  await bob.locator('#sessions li[data-session="p2p:alice:bob"] button').click();
  await message(bob, "Hi Alice!").waitFor({ timeout: WAIT });

  step = "mallory sends alice a read receipt for a session named __proto__";
  // ids are chosen by users: one named __proto__ must not reach Object.prototype in alice's page
  const mallory = await (await browser.newContext()).newPage();
  await mallory.goto(APP);
  const attack = await mallory.evaluate(async (ws) => {
    const login = await fetch("/v1/dev/login", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ userId: "mallory" }),
    });
    const { token } = await login.json();
    const sock = new WebSocket(ws);
    const inbox = [];
    let wake = null;
    sock.onmessage = (e) => { inbox.push(JSON.parse(e.data)); if (wake) wake(); };
    await new Promise((resolve, reject) => { sock.onopen = resolve; sock.onerror = reject; });
    async function next(type) {
      const end = Date.now() + 10000;
      for (;;) {
        const i = inbox.findIndex((f) => f.type === type || f.type === "error");
        if (i >= 0) return inbox.splice(i, 1)[0];
        if (Date.now() > end) throw new Error(`no ${type}`);
        await new Promise((resolve) => { wake = resolve; setTimeout(resolve, 200); });
      }
    }
    sock.send(JSON.stringify({ type: "auth", token }));
    const auth = await next("auth_reply");
    await next("sync_done");
    sock.send(JSON.stringify({ type: "session_create", id: "p1", members: ["alice"], sessionId: "__proto__" }));
    const created = await next("session_reply");
    sock.send(JSON.stringify({ type: "message", clientMsgId: "p-1", sessionId: "__proto__", body: { text: "hi from __proto__" } }));
    const sent = await next("message_reply");
    sock.send(JSON.stringify({ type: "read", sessionId: "__proto__", seq: sent.seq }));
    await new Promise((resolve) => setTimeout(resolve, 500));
    sock.close();
    return { auth: auth.ok, created: created.ok, sent: sent.ok, seq: sent.seq };
  }, WS_A);
  check(attack.auth && attack.created && attack.sent, `mallory set up the session (${JSON.stringify(attack)})`);
  await alice.locator('#sessions li[data-session="__proto__"]').waitFor({ timeout: WAIT });
  // the receipt arrived: remembered as the session's own entry, as any other, or (the bug) written
  // onto Object.prototype, where every object of the page inherits it
  await alice.waitForFunction(() => {
    const saved = JSON.parse(localStorage.getItem("imcluster.receipts.alice") || "{}");
    const remembered = Object.prototype.hasOwnProperty.call(saved, "__proto__") && saved["__proto__"].mallory >= 1;
    return remembered || Object.keys(Object.prototype).length > 0;
  }, null, { timeout: WAIT });
  const polluted = await alice.evaluate(() => Object.keys(Object.prototype));
  check(polluted.length === 0, `Object.prototype is clean in alice's page (found ${polluted.join(", ")})`);

  step = "alice's page still works: she opens __proto__ and chats with bob";
  await alice.locator('#sessions li[data-session="__proto__"] button').click();
  await message(alice, "hi from __proto__").waitFor({ timeout: WAIT });
  await alice.locator('#sessions li[data-session="p2p:alice:bob"] button').click();
  await say(alice, "Still here after __proto__");
  await message(bob, "Still here after __proto__").waitFor({ timeout: WAIT });
  await message(alice, "Still here after __proto__").and(alice.locator("[data-status=read]"))
    .waitFor({ timeout: WAIT });

  step = "screenshots";
  await alice.screenshot({ path: join(ARTIFACTS, "chat-desktop.png") });
  await bob.screenshot({ path: join(ARTIFACTS, "chat-phone.png") });
  check(problems.length === 0, `no page errors: ${problems.join("; ")}`);
  console.log("browser chat: all steps passed");
  console.log("1 passed, 0 failed");
} catch (e) {
  console.error(`FAILED at "${step}": ${e.message}`);
  for (const p of problems) console.error(p);
  try {
    for (const context of browser.contexts()) {
      for (const [i, page] of context.pages().entries()) {
        await page.screenshot({ path: join(ARTIFACTS, `failure-${browser.contexts().indexOf(context)}-${i}.png`) });
      }
    }
  } catch { /* the browser may be gone */ }
  process.exitCode = 1;
} finally {
  await browser.close();
}
