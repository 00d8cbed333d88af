// End-to-end test of the chat page (web/) in a real browser: headless Debian
// Chromium driven by playwright-core, against a private redis-server and two
// Switchboard instances started here (the set-up is in harness.mjs). Run with
// `bash tests/e2e/run.sh`, or, once the server is built:
// `node --test tests/e2e/chat.test.mjs`.
//
// Environment: SWITCHBOARD_BIN (default target/debug/switchboard),
// CHROMIUM_PATH (default /usr/bin/chromium), SCREENSHOT_DIR (where the
// screenshots go, default target/e2e/screenshots: untracked), and
// SB_E2E_UPDATE_SCREENSHOTS=1 to write them to docs/img instead, replacing
// the README's pictures.

import { before } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import {
  ROOT,
  VIEWPORT,
  attr,
  browser,
  byTest,
  contactRow,
  freePort,
  instanceLabel,
  launchBrowser,
  openPage,
  roomRow,
  signIn,
  sleep,
  startInstance,
  startRedis,
  step,
  stop,
  tail,
  teardown,
  until,
  waitReady,
} from "./harness.mjs";

const SHOTS =
  process.env.SB_E2E_UPDATE_SCREENSHOTS === "1"
    ? path.join(ROOT, "docs/img")
    : process.env.SCREENSHOT_DIR || path.join(ROOT, "target/e2e/screenshots");
const XSS = "<img src=x onerror=alert(1)>";

const pages = {}; // alice, bob: { page, dialogs, problems, sent }
const instances = {}; // node1, node2

async function messages(page, list = "message-list") {
  return byTest(page, list).locator('[data-testid="message"]').evaluateAll((nodes) =>
    nodes.map((node) => ({
      dir: node.dataset.dir,
      from: node.querySelector('[data-testid="message-from"]').textContent,
      body: node.querySelector('[data-testid="message-body"]').textContent,
      time: node.querySelector('[data-testid="message-time"]').textContent,
      ack: node.querySelector('[data-testid="message-ack"]')?.dataset.status ?? null,
      ackText: node.querySelector('[data-testid="message-ack"]')?.textContent ?? null,
      stored: node.dataset.stored ?? null,
      delivered: node.dataset.delivered === "yes",
      tick: (() => {
        const tick = node.querySelector('[data-testid="message-receipt"]');
        return tick && !tick.hidden ? tick.textContent : null;
      })(),
      replayed: node.dataset.replayed === "yes",
      afterDivider: node.previousElementSibling?.dataset.testid === "away-divider",
    })),
  );
}

async function lastMessage(page, list = "message-list") {
  const all = await messages(page, list);
  return all[all.length - 1];
}

async function send(page, text) {
  const input = byTest(page, "composer-input");
  await input.fill(text);
  await input.press("Enter");
}

/** Sends a message and waits for its ack label to leave "pending". */
async function sendAndAck(page, text, list = "message-list") {
  await send(page, text);
  return until(`ack of ${JSON.stringify(text)}`, async () => {
    const last = await lastMessage(page, list);
    return last && last.body === text && last.ack !== "pending" && last;
  });
}

// ---------------------------------------------------------------------------
// Set-up and tear-down
// ---------------------------------------------------------------------------

before(async () => {
  await launchBrowser();
  await startRedis();
  instances.node1 = startInstance("node1", await freePort());
  instances.node2 = startInstance("node2", await freePort());
  await Promise.all([waitReady(instances.node1), waitReady(instances.node2)]);
  pages.alice = await openPage();
  pages.bob = await openPage();
});

teardown();

// ---------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------

step("the page is served with its CSP and refused credentials show an error", async () => {
  const response = await fetch(`http://127.0.0.1:${instances.node1.port}/`);
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-security-policy") || "", /script-src 'self'/);
  // The page's connection is the reference client module, served beside app.js.
  const module = await fetch(`http://127.0.0.1:${instances.node1.port}/client.mjs`);
  assert.equal(module.status, 200, "GET /client.mjs (web/client.mjs, imported by app.js) must be served");
  assert.match(module.headers.get("content-type") || "", /javascript/);
  assert.match(await module.text(), /export class SwitchboardClient/);

  const { page } = pages.bob;
  await page.goto(`http://127.0.0.1:${instances.node2.port}/`);
  await byTest(page, "signin-token").fill("not-a-valid-token");
  await byTest(page, "signin-submit").click();
  const error = byTest(page, "signin-error");
  await error.waitFor({ state: "visible" });
  assert.match(await error.textContent(), /invalid credentials/i);
  assert.ok(await byTest(page, "signin-form").isVisible(), "still on the sign-in form");
  assert.doesNotMatch(page.url(), /token/, "the token never enters the page URL");
  await byTest(page, "signin-token").fill("");
});

step("alice signs in on node1 and bob on node2", async () => {
  await signIn(pages.alice.page, instances.node1.port, "alice");
  await signIn(pages.bob.page, instances.node2.port, "bob");
  assert.equal(await instanceLabel(pages.alice.page), "node1");
  assert.equal(await instanceLabel(pages.bob.page), "node2");
  assert.equal(await byTest(pages.alice.page, "identity-user").textContent(), "alice");
  assert.equal(await byTest(pages.bob.page, "identity-user").textContent(), "bob");
});

step("alice adds bob (online) and carol (offline)", async () => {
  const { page } = pages.alice;
  for (const user of ["carol", "bob"]) {
    await byTest(page, "contact-add-input").fill(user);
    await byTest(page, "contact-add-button").click();
  }
  await until("bob online on alice's page", async () =>
    (await attr(contactRow(page, "bob"), "data-presence")) === "online");
  await until("carol offline on alice's page", async () =>
    (await attr(contactRow(page, "carol"), "data-presence")) === "offline");
  assert.equal(
    await contactRow(page, "bob").locator('[data-testid="presence-dot"]').getAttribute("data-presence"),
    "online",
  );
});

step("a DM crosses instances: routed, shown on bob's page, answered", async () => {
  const alice = pages.alice.page;
  const bob = pages.bob.page;
  await contactRow(alice, "bob").locator(".row-main").click();
  const sent = await sendAndAck(alice, "hello bob");
  assert.equal(sent.ack, "routed");
  assert.equal(sent.ackText, "routed");

  // bob gets alice as a new contact with an unread badge, then opens the chat.
  const unread = contactRow(bob, "alice").locator('[data-testid="unread"]');
  await until("unread badge on bob's page", async () => (await unread.textContent()) === "1");
  await contactRow(bob, "alice").locator(".row-main").click();
  const got = await until("alice's DM on bob's page", () => lastMessage(bob));
  assert.equal(got.dir, "in");
  assert.equal(got.from, "alice");
  assert.equal(got.body, "hello bob");
  assert.match(got.time, /\d/);

  const reply = await sendAndAck(bob, "hi alice");
  assert.equal(reply.ack, "routed");
  await until("bob's reply on alice's page", async () => (await lastMessage(alice)).body === "hi alice");
  assert.equal((await lastMessage(alice)).from, "bob");

  // A DM to a user nobody holds is acked `offline`.
  await contactRow(alice, "carol").locator(".row-main").click();
  assert.equal((await sendAndAck(alice, "are you there?")).ack, "offline");
  await contactRow(alice, "bob").locator(".row-main").click();
});

step("both join a room and exchange room messages", async () => {
  for (const { page } of [pages.alice, pages.bob]) {
    await byTest(page, "room-join-input").fill("lobby");
    await byTest(page, "room-join-button").click();
    await until("lobby joined", async () => (await attr(roomRow(page, "lobby"), "data-joined")) === "yes");
    await byTest(page, "room-message-list").waitFor({ state: "visible" });
  }
  const alice = pages.alice.page;
  const bob = pages.bob.page;
  const mine = await sendAndAck(alice, "hello lobby", "room-message-list");
  assert.equal(mine.ack, "ok");
  assert.equal(mine.dir, "out", "the sender's own room message is echoed locally");
  await until("alice's room message on bob's page", async () => {
    const last = await lastMessage(bob, "room-message-list");
    return last && last.body === "hello lobby" && last.from === "alice";
  });
  assert.equal((await sendAndAck(bob, "hi everyone", "room-message-list")).ack, "ok");
  await until("bob's room message on alice's page", async () => {
    const last = await lastMessage(alice, "room-message-list");
    return last && last.body === "hi everyone" && last.from === "bob";
  });
  const aliceRoom = await messages(alice, "room-message-list");
  assert.deepEqual(aliceRoom.map((m) => m.body), ["hello lobby", "hi everyone"], "no duplicate echo");
});

step("bob's instance restarts: offline, then bob reconnects by himself", async () => {
  const alice = pages.alice.page;
  const bob = pages.bob.page;
  const { port } = instances.node2;
  const exit = await stop(instances.node2, "SIGTERM");
  assert.equal(exit.code, 0, `node2 exit: ${JSON.stringify(exit)}\n${tail(instances.node2.logPath)}`);

  await until("bob's page notices the drop", async () =>
    (await attr(byTest(bob, "conn-state"), "data-state")) !== "connected");
  await until("bob offline on alice's page", async () =>
    (await attr(contactRow(alice, "bob"), "data-presence")) === "offline");

  instances.node2 = startInstance("node2b", port);
  await waitReady(instances.node2);
  const restarted = Date.now();
  await until("bob's page reconnected", async () =>
    (await attr(byTest(bob, "conn-state"), "data-state")) === "connected", 20000);
  console.log(`# bob reconnected ${Date.now() - restarted} ms after node2b was ready`);
  assert.equal(await instanceLabel(bob), "node2b");
  await until("bob online again on alice's page", async () =>
    (await attr(contactRow(alice, "bob"), "data-presence")) === "online");

  // The DM flow resumes.
  await contactRow(alice, "bob").locator(".row-main").click();
  const sent = await sendAndAck(alice, "welcome back");
  assert.equal(sent.ack, "routed");
  await contactRow(bob, "alice").locator(".row-main").click();
  await until("the DM after the restart on bob's page", async () =>
    (await lastMessage(bob)).body === "welcome back");

  // The page joined its rooms again on the new connection.
  await until("bob back in lobby", async () => (await attr(roomRow(bob, "lobby"), "data-joined")) === "yes");
  await roomRow(alice, "lobby").locator(".row-main").click();
  assert.equal((await sendAndAck(alice, "room works again", "room-message-list")).ack, "ok");
  await roomRow(bob, "lobby").locator(".row-main").click();
  await until("room message after the restart on bob's page", async () =>
    (await lastMessage(bob, "room-message-list")).body === "room works again");
});

step("a body with markup is shown as text, never run", async () => {
  const alice = pages.alice.page;
  const bob = pages.bob.page;
  await contactRow(alice, "bob").locator(".row-main").click();
  await contactRow(bob, "alice").locator(".row-main").click();
  assert.equal((await sendAndAck(alice, XSS)).ack, "routed");
  await until("the markup body on bob's page", async () => (await lastMessage(bob)).body === XSS);
  // The CSP would also block the inline handler: the real proof is that no
  // element was created from the body.
  assert.equal(await byTest(bob, "message-list").locator("img").count(), 0);
  assert.equal(await byTest(alice, "message-list").locator("img").count(), 0);
  await sleep(300);
  assert.deepEqual(pages.bob.dialogs, []);
  assert.deepEqual(pages.alice.dialogs, []);
});

step("bob closes his tab, alice sends 3 DMs, bob's new tab shows them; alice sees them delivered", async () => {
  const alice = pages.alice.page;
  await contactRow(alice, "bob").locator(".row-main").click();
  const before = (await messages(alice)).length;
  assert.deepEqual(pages.bob.problems, [], "bob's first tab had no script error");
  await pages.bob.page.context().close();
  await until("bob offline on alice's page", async () =>
    (await attr(contactRow(alice, "bob"), "data-presence")) === "offline");

  const texts = ["while you were out 1", "while you were out 2", "while you were out 3"];
  for (const text of texts) {
    const sent = await sendAndAck(alice, text);
    assert.equal(sent.ack, "offline", "nobody online: offline...");
    assert.equal(sent.stored, "yes", "...but stored in bob's inbox");
  }
  await sleep(300);
  const waiting = (await messages(alice)).slice(before);
  assert.deepEqual(waiting.map((m) => m.delivered), [false, false, false], "not delivered while bob is away");

  // A new tab (a fresh browser context: no localStorage): the server replays
  // after bob's cursor, which his first tab moved with `recv`.
  pages.bob = await openPage();
  const bob = pages.bob.page;
  await signIn(bob, instances.node2.port, "bob");
  const unread = contactRow(bob, "alice").locator('[data-testid="unread"]');
  await until("3 unread from alice on bob's new tab", async () => (await unread.textContent()) === "3");
  await contactRow(bob, "alice").locator(".row-main").click();
  const got = await messages(bob);
  assert.deepEqual(got.map((m) => m.body), texts, "exactly the 3 missed DMs, in order, nothing acknowledged before");
  assert.deepEqual(got.map((m) => m.replayed), [true, true, true]);
  assert.ok(got[0].afterDivider, "a 'while you were away' divider precedes them");
  const divider = byTest(bob, "away-divider");
  assert.equal(await divider.count(), 1);
  assert.match(await divider.textContent(), /while you were away/i);

  // bob's tab acknowledged them (recv): alice's page shows the receipts.
  await until("alice's 3 DMs delivered", async () =>
    (await messages(alice)).slice(before).every((m) => m.delivered && m.tick === "✓ delivered"));
  const done = (await messages(alice)).slice(before);
  assert.deepEqual(done.map((m) => m.ack), ["offline", "offline", "offline"], "the ack label is kept");

  // Live again: a new DM is shown at once, not as part of the backlog.
  const live = await sendAndAck(alice, "glad you are back");
  assert.equal(live.ack, "routed");
  await until("the live DM on bob's tab", async () => (await lastMessage(bob)).body === "glad you are back");
  assert.equal((await lastMessage(bob)).replayed, false);
  await until("the live DM delivered", async () => (await lastMessage(alice)).delivered);

  // The new tab joins the room again for the steps that follow.
  await byTest(bob, "room-join-input").fill("lobby");
  await byTest(bob, "room-join-button").click();
  await until("lobby joined on bob's new tab", async () =>
    (await attr(roomRow(bob, "lobby"), "data-joined")) === "yes");
  await contactRow(bob, "alice").locator(".row-main").click();
  await pages.bob.page.mouse.move(600, 20);
});

step("no script errors and no CSP violations on either page; presence is watched, never polled", async () => {
  assert.deepEqual(pages.alice.problems, []);
  assert.deepEqual(pages.bob.problems, []);
  for (const who of ["alice", "bob"]) {
    const types = pages[who].sent.map(({ frame }) => frame.type);
    assert.ok(!types.includes("presence"), `${who}'s page sent no presence query: ${types.join(" ")}`);
  }
  const watches = pages.alice.sent.filter(({ frame }) => frame.type === "watch");
  assert.ok(watches.some(({ frame }) => frame.users.includes("bob")), "alice's page watched bob");
});

step("screenshots for the README", async () => {
  const alice = pages.alice.page;
  const bob = pages.bob.page;
  // A last friendly exchange so the pictures end on a readable note.
  await sendAndAck(bob, "that was just text, nice");
  await until("bob's last DM on alice's page", async () =>
    (await lastMessage(alice)).body === "that was just text, nice");
  // bob looks at the room; alice's next DM shows as an unread badge there.
  await roomRow(bob, "lobby").locator(".row-main").click();
  await sendAndAck(alice, "see you in the lobby!");
  await until("unread badge for alice's last DM on bob's page", async () =>
    (await contactRow(bob, "alice").locator('[data-testid="unread"]').textContent()) === "1");
  await alice.mouse.move(600, 20);
  await bob.mouse.move(600, 20);

  fs.mkdirSync(SHOTS, { recursive: true });
  const aliceShot = await alice.screenshot({ path: path.join(SHOTS, "chat-alice.png") });
  const bobShot = await bob.screenshot({ path: path.join(SHOTS, "chat-bob.png") });

  // Side by side, composed by the browser itself (about:blank has no CSP).
  const gap = 12;
  const canvas = await browser.newPage({
    viewport: { width: VIEWPORT.width * 2 + gap * 3, height: VIEWPORT.height + gap * 2 },
  });
  const img = (png, label) =>
    `<img alt="${label}" src="data:image/png;base64,${png.toString("base64")}"` +
    ` style="display:block;width:${VIEWPORT.width}px;height:${VIEWPORT.height}px;border-radius:8px">`;
  await canvas.setContent(
    `<body style="margin:0;padding:${gap}px;display:flex;gap:${gap}px;background:#c9cedd">` +
      `${img(aliceShot, "alice on node1")}${img(bobShot, "bob on node2b")}</body>`,
  );
  await canvas.screenshot({ path: path.join(SHOTS, "chat.png") });
  await canvas.close();
  for (const name of ["chat.png", "chat-alice.png", "chat-bob.png"]) {
    assert.ok(fs.statSync(path.join(SHOTS, name)).size > 10000, `${name} written`);
  }
});
