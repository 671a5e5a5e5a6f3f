// The web chat's conversation features (PROTOCOL.md 1.1) and its rough edges, in a real browser.
//
// alice on a desktop (gateway A), bob on a phone-sized screen (gateway B): live presence across
// the two gateways (no polling), "delivered" between "sent" and "read", "typing...", recall and
// edit from a message's menu, a membership notice, the unread badge after logging in again, a
// 70,000-character message (refused with a reason, nothing sent, nothing lost), "show more", and
// the phone's own connection state when its WebSocket is cut. Run by tests/test_browser.py:
//
//   IMTEST_APP_URL=http://127.0.0.1:8090/app/ IMTEST_WS_A=ws://.../ws IMTEST_WS_B=ws://.../ws \
//   IMTEST_ARTIFACTS=/tmp/artifacts node features.e2e.mjs
//
// Exit status 0 when every step passed; screenshots are left in IMTEST_ARTIFACTS
// (features-desktop.png, features-phone.png, phone-offline.png).
import { mkdirSync } from "node:fs";
import { join } from "node:path";

import { chromium } from "playwright-core";

const APP = process.env.IMTEST_APP_URL;
const WS_A = process.env.IMTEST_WS_A;
const WS_B = process.env.IMTEST_WS_B;
const ARTIFACTS = process.env.IMTEST_ARTIFACTS || "artifacts";
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const WAIT = Number(process.env.IMTEST_BROWSER_WAIT || 10000);
// PROTOCOL.md: presence changes reach subscribers within 5 s
const PRESENCE_WAIT = 5000 + 1500;
// IMTEST_LIVE=0: a server without typing and live presence (the page then polls presence through
// imapi): those steps are left out, the others run
const LIVE = process.env.IMTEST_LIVE !== "0";

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

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

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

async function open(page, sessionId) {
  if (await page.locator("#back").isVisible()) await page.locator("#back").click();
  await page.locator(`#sessions li[data-session="${sessionId}"] button`).click();
}

const P2P = "p2p:alice:bob";

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
  const sockets = { alice: 0, bob: 0 };
  let cut = false;
  let quiet = false;  // while bob's network is cut (and until he is back)
  let lag = 0;
  const presencePolls = [];
  for (const [name, page] of [["alice", alice], ["bob", bob]]) {
    page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
    page.on("console", (m) => {
      // while bob's network is cut, the browser reports the refused connections: expected
      if (m.type() === "error" && !(name === "bob" && quiet && /Failed to load resource/.test(m.text()))) {
        problems.push(`${name}: console: ${m.text()}`);
      }
    });
    page.on("websocket", () => { sockets[name] += 1; });
    page.on("request", (r) => { if (/\/v1\/users\/[^/]+\/presence/.test(r.url())) presencePolls.push(r.url()); });
  }
  // bob's WebSocket goes through the test: cut = true closes it and refuses new ones (a phone
  // that lost its network, as the page sees it); lag > 0 delays the deliveries and sync_done
  // the gateway sends (a slow sync, which then lands after the page's other requests)
  const bobSockets = [];
  await bob.routeWebSocket(/.*/, (ws) => {
    if (cut) {
      ws.close({ code: 1006, reason: "cut" });
      return;
    }
    const server = ws.connectToServer();
    let delayed = Promise.resolve();  // frames keep their order
    let gate = null;
    server.onMessage((m) => {
      const slow = lag && /"type":"(message_send|sync_done)"/.test(String(m));
      if (slow && !gate) gate = sleep(lag);
      delayed = delayed.then(() => (slow ? gate : null)).then(() => ws.send(m));
    });
    bobSockets.push(ws);
  });

  step = "log in on two gateways; alice opens the 1:1 and says hello";
  await login(alice, "alice", WS_A);
  await login(bob, "bob", WS_B);
  await alice.locator("#new-members").fill("bob");
  await alice.locator("#new-members").press("Enter");
  await say(alice, "Hello Bob");
  await message(alice, "Hello Bob").and(alice.locator("[data-status]")).waitFor({ timeout: WAIT });

  step = "live presence across gateways: bob shows online in alice's header and list, without polling";
  if (LIVE) await alice.locator("#conv-sub[data-presence=online]").waitFor({ timeout: PRESENCE_WAIT });
  if (LIVE) await alice.locator(`#sessions li[data-session="${P2P}"] .dot.on`).waitFor({ timeout: PRESENCE_WAIT });

  step = "delivered: bob's phone has the message (he has not opened it): alice sees Delivered, then Read";
  await message(alice, "Hello Bob").and(alice.locator("[data-status=delivered]")).waitFor({ timeout: WAIT });
  const delivered = await message(alice, "Hello Bob").locator(".status").textContent();
  check(delivered.includes("Delivered"), `the mark says Delivered (${delivered})`);
  await bob.locator(`#sessions li[data-session="${P2P}"] .badge`, { hasText: "1" }).waitFor({ timeout: WAIT });
  await open(bob, P2P);
  await message(bob, "Hello Bob").waitFor({ timeout: WAIT });
  await message(alice, "Hello Bob").and(alice.locator("[data-status=read]")).waitFor({ timeout: WAIT });

  step = "typing: bob types, alice sees the typing line and 'typing…' in the header; gone once he sends";
  await bob.locator("#text").pressSequentially("Typing on a phone", { delay: 120 });
  if (LIVE) await alice.locator("#typing", { hasText: "bob is typing" }).waitFor({ timeout: WAIT });
  if (LIVE) await alice.locator("#conv-sub[data-presence=typing]").waitFor({ timeout: WAIT });
  await bob.locator("#text").press("Enter");
  await message(alice, "Typing on a phone").waitFor({ timeout: WAIT });
  if (LIVE) await alice.locator("#typing").waitFor({ state: "hidden", timeout: WAIT });

  step = "recall from the message's menu: both see it recalled; it never shows as a bubble of its own";
  await say(alice, "Oops, wrong chat");
  await message(bob, "Oops, wrong chat").waitFor({ timeout: WAIT });
  const oops = message(alice, "Oops, wrong chat");
  await oops.locator(".menu-button").click();
  await oops.locator("[data-action=recall]").click();
  await alice.locator(".msg[data-recalled=true]", { hasText: "You recalled this message" }).waitFor({ timeout: WAIT });
  await bob.locator(".msg[data-recalled=true]", { hasText: "This message was recalled" }).waitFor({ timeout: WAIT });
  check(await message(bob, "Oops, wrong chat").count() === 0, "the recalled text is gone from bob's page");

  step = "edit from the menu: bob sees the new text, marked edited";
  await say(alice, "See you at 10");
  await message(bob, "See you at 10").waitFor({ timeout: WAIT });
  const see = message(alice, "See you at 10");
  await see.locator(".menu-button").click();
  await see.locator("[data-action=edit]").click();
  await alice.locator("#editing").waitFor({ timeout: WAIT });
  check(await alice.locator("#text").inputValue() === "See you at 10", "the composer holds the text to edit");
  await alice.locator("#text").fill("See you at 11 (not 10)");
  await alice.locator("#text").press("Enter");
  await message(bob, "See you at 11 (not 10)").and(bob.locator("[data-edited=true]")).waitFor({ timeout: WAIT });
  await message(alice, "See you at 11 (not 10)").and(alice.locator("[data-edited=true]")).waitFor({ timeout: WAIT });
  check(await bob.locator(".msg", { hasText: "See you at 10" }).count() === 0, "the old text is gone");

  step = "after a reload, history shows the recalled and edited states (no event bubbles)";
  await bob.reload();
  // the badge lives in the list pane, hidden on a phone with a conversation open
  await bob.locator("#conn-state[data-state=ready]").waitFor({ state: "attached", timeout: WAIT });
  await bob.locator(".msg[data-recalled=true]").waitFor({ timeout: WAIT });
  await message(bob, "See you at 11 (not 10)").and(bob.locator("[data-edited=true]")).waitFor({ timeout: WAIT });
  const bubbles = await bob.locator(".msg .bubble").allTextContents();
  check(!bubbles.some((t) => t === "null" || t.includes('"kind"')), `no event shown as a bubble: ${bubbles.join(" | ")}`);

  step = "a 70,000-character message: refused with a reason, the text kept, nothing sent, later messages go";
  const before = sockets.alice;
  const long = "x".repeat(70000);
  await alice.locator("#text").fill(long);
  await alice.locator("#text").press("Enter");
  await alice.locator("#composer-error", { hasText: "too long" }).waitFor({ timeout: WAIT });
  check((await alice.locator("#text").inputValue()).length === 70000, "the text stays in the box");
  check(await alice.locator(".msg[data-status=sending]").count() === 0, "no bubble stuck in sending…");
  await sleep(3000);
  check(sockets.alice === before, `no reconnect (${sockets.alice - before} new WebSockets)`);
  check(await alice.locator("#conn-state[data-state=ready]").count() === 1, "still online");
  await say(alice, "After the long one");
  await message(bob, "After the long one").waitFor({ timeout: WAIT });
  await message(alice, "After the long one").and(alice.locator("[data-status=read]")).waitFor({ timeout: WAIT });
  check(await alice.locator("#composer-error").isHidden(), "the reason goes away once a message is sent");

  step = "a long message (under the limit) is collapsed with Show more";
  const essay = Array.from({ length: 40 }, (_, i) => `Line ${i + 1} of a long report.`).join("\n");
  await say(alice, essay);
  const report = message(bob, "Line 1 of a long report.");
  await report.locator("button.more", { hasText: "Show more" }).waitFor({ timeout: WAIT });
  check(!(await report.textContent()).includes("Line 40"), "collapsed: the end is hidden");
  await report.locator("button.more").click();
  await message(bob, "Line 40 of a long report.").locator("button.more", { hasText: "Show less" }).waitFor({ timeout: WAIT });

  step = "marks on the last bubble of a run only; a date separator";
  await say(alice, "One");
  await say(alice, "Two");
  await say(alice, "Three");
  await message(alice, "Three").and(alice.locator("[data-status=read]")).waitFor({ timeout: WAIT });
  const bubble = (text) => alice.locator(".msg", { has: alice.locator(".bubble .text", { hasText: new RegExp(`^${text}$`) }) });
  check(await bubble("One").locator(".meta").count() === 0, "no time under 'One' (a run goes on)");
  check(await bubble("Two").locator(".meta").count() === 0, "no time under 'Two'");
  check(await bubble("Three").locator(".meta").count() === 1, "time and mark under 'Three'");
  check(await alice.locator("#message-list li.day", { hasText: "Today" }).count() === 1, "one 'Today' separator");

  step = "a group: a membership notice, not a bubble, and a group avatar unlike a 1:1's";
  await alice.locator("#new-members").fill("bob, carol");
  await alice.locator("#new-members").press("Enter");
  await alice.locator("#conv-sub", { hasText: "3 members" }).waitFor({ timeout: WAIT });
  await say(alice, "Welcome to the team room");
  await bob.locator("#back").click();
  const group = bob.locator("#sessions li", { hasText: "Welcome to the team room" });
  await group.locator(".badge", { hasText: "1" }).waitFor({ timeout: WAIT });
  check(await group.locator(".avatar.group").count() === 1, "the group has a group avatar");
  check(await bob.locator(`#sessions li[data-session="${P2P}"] .avatar.group`).count() === 0, "the 1:1 does not");
  await group.locator("button").click();
  await bob.locator("#message-list li.notice", { hasText: "alice added" }).waitFor({ timeout: WAIT });
  await message(bob, "Welcome to the team room").waitFor({ timeout: WAIT });

  step = "the unread badge after logging in again: 5 messages show as 5, not 10";
  await bob.locator("#back").click();
  await bob.locator("#logout").click();
  await alice.locator(`#sessions li[data-session="${P2P}"] button`).click();
  if (LIVE) await alice.locator("#conv-sub[data-presence=offline]").waitFor({ timeout: PRESENCE_WAIT });
  for (let i = 1; i <= 5; i++) await say(alice, `While you were away ${i}`);
  await message(alice, "While you were away 5").and(alice.locator("[data-status=sent]")).waitFor({ timeout: WAIT });
  lag = 1500;  // the sync lands after the sessions' list (with its unread count) has
  await login(bob, "bob", WS_B);
  const row = bob.locator(`#sessions li[data-session="${P2P}"]`);
  await row.locator(".badge").waitFor({ timeout: WAIT });
  await sleep(3500);  // the sync and the sessions' list have both landed
  lag = 0;
  const badge = await row.locator(".badge").textContent();
  check(badge === "5", `the badge says 5 (it says ${badge})`);
  if (LIVE) await alice.locator("#conv-sub[data-presence=online]").waitFor({ timeout: PRESENCE_WAIT });
  await message(alice, "While you were away 5").and(alice.locator("[data-status=delivered]")).waitFor({ timeout: WAIT });
  if (LIVE) check(presencePolls.length === 0, `presence is live, not polled (${presencePolls.length} requests)`);

  step = "screenshots: desktop and phone with a conversation open";
  await open(bob, P2P);
  await message(bob, "While you were away 5").waitFor({ timeout: WAIT });
  await bob.locator("#text").pressSequentially("On my way", { delay: 150 });
  if (LIVE) await alice.locator("#typing", { hasText: "bob is typing" }).waitFor({ timeout: WAIT });
  await alice.screenshot({ path: join(ARTIFACTS, "features-desktop.png") });
  await bob.screenshot({ path: join(ARTIFACTS, "features-phone.png") });

  step = "the phone loses its connection with a conversation open: the conversation pane says so";
  quiet = true;
  cut = true;
  for (const ws of bobSockets) ws.close({ code: 1006, reason: "cut" });
  await bob.locator("#conv-conn:not([hidden])", { hasText: "Connection lost" }).waitFor({ timeout: WAIT });
  check(await bob.locator("#conv-conn").isVisible(), "the connection state is visible in the conversation");
  check(await bob.locator("#conv-avatar .dot").count() === 1 && !(await bob.locator("#conv-avatar .dot").isVisible()),
    "no online dot while one's own connection is down (a last known state would be a guess)");
  await bob.screenshot({ path: join(ARTIFACTS, "phone-offline.png") });
  cut = false;
  await bob.locator("#conv-conn").waitFor({ state: "hidden", timeout: WAIT + 30000 });
  if (LIVE) await alice.locator("#conv-sub[data-presence=online]").waitFor({ timeout: PRESENCE_WAIT });
  quiet = false;

  step = "the documentation's screenshots (docs/web-chat.png, docs/web-chat-phone.png)";
  const emma = await desktop.newPage();
  const noah = await (await browser.newContext({ viewport: { width: 390, height: 760 }, deviceScaleFactor: 2,
    isMobile: true, hasTouch: true })).newPage();
  for (const [name, page] of [["emma", emma], ["noah", noah]]) {
    page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
  }
  await login(emma, "emma", WS_A);
  await login(noah, "noah", WS_B);
  await emma.locator("#new-members").fill("noah, olivia");
  await emma.locator("#new-members").press("Enter");
  await emma.locator("#conv-sub", { hasText: "3 members" }).waitFor({ timeout: WAIT });
  await say(emma, "Design review moved to Thursday, slides in the shared folder.");
  await emma.locator("#new-members").fill("noah");
  await emma.locator("#new-members").press("Enter");
  const EN = "p2p:emma:noah";
  await say(emma, "Morning! Are we still on for the review?");
  await noah.locator(`#sessions li[data-session="${EN}"] button`).click();
  await message(noah, "Are we still on").waitFor({ timeout: WAIT });
  await say(noah, "Yes, 10:30 in the small room.");
  await message(emma, "10:30 in the small room").waitFor({ timeout: WAIT });
  const slot = message(noah, "10:30 in the small room");
  await slot.locator(".menu-button").click();
  await slot.locator("[data-action=edit]").click();
  await noah.locator("#text").fill("Yes, 11:00 in the small room.");
  await noah.locator("#text").press("Enter");
  await message(emma, "11:00 in the small room").and(emma.locator("[data-edited=true]")).waitFor({ timeout: WAIT });
  await say(noah, "I'll bring the printouts for everyone");
  await message(emma, "printouts").waitFor({ timeout: WAIT });
  const printouts = message(noah, "printouts");
  await printouts.locator(".menu-button").click();
  await printouts.locator("[data-action=recall]").click();
  await emma.locator(".msg[data-recalled=true]").waitFor({ timeout: WAIT });
  await say(emma, "Perfect. Can you send me the slides before?");
  await say(emma, "Even a draft is fine :)");
  await message(noah, "Even a draft").waitFor({ timeout: WAIT });
  await say(noah, "Sure, sending them in a minute");
  await message(noah, "sending them").and(noah.locator("[data-status=read]")).waitFor({ timeout: WAIT });
  await say(emma, "Thanks!");
  await message(emma, "Thanks!").and(emma.locator("[data-status=read]")).waitFor({ timeout: WAIT });
  await noah.locator("#text").pressSequentially("Here they are", { delay: 150 });
  if (LIVE) await emma.locator("#typing", { hasText: "noah is typing" }).waitFor({ timeout: WAIT });
  await emma.screenshot({ path: join(ARTIFACTS, "docs-desktop.png") });
  await noah.locator("#text").fill("");
  await emma.locator("#text").pressSequentially("One more thing", { delay: 150 });
  if (LIVE) await noah.locator("#typing", { hasText: "emma is typing" }).waitFor({ timeout: WAIT });
  await noah.screenshot({ path: join(ARTIFACTS, "docs-phone.png") });

  check(problems.length === 0, `no page errors: ${problems.join("; ")}`);
  console.log("browser features: all steps passed");
  console.log("1 passed, 0 failed");
} catch (e) {
  console.error(`FAILED at "${step}": ${e.message}`);
  for (const p of problems) console.error(p);
  try {
    for (const context of browser.contexts()) {
      for (const [i, page] of context.pages().entries()) {
        await page.screenshot({ path: join(ARTIFACTS, `failure-features-${browser.contexts().indexOf(context)}-${i}.png`) });
      }
    }
  } catch { /* the browser may be gone */ }
  process.exitCode = 1;
} finally {
  await browser.close();
}
