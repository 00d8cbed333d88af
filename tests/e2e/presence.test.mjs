// End-to-end test of presence events and room member lists on the chat page
// (issue #14), in headless Chromium, against a private redis-server and three
// Switchboard instances with a short lease and a short presence grace:
//
// - alice (node1) watches bob: her page never polls (no `presence` query is
//   ever sent); bob's dot follows `presence_event` frames.
// - bob (node2) is SIGKILLed with his only connection: his dot turns offline
//   and he leaves alice's member list within the lease + a few seconds (the
//   dead instance is reaped by a survivor); online again and back in the list
//   when he reconnects to node3.
// - alice's own instance restarts: her page watches its contacts and asks for
//   the room's members again on the new connection, and the events keep
//   coming (bob leaving the room, bob closing his tab).
//
// Every wait on the page polls the DOM with a bounded deadline (`until`); the
// deadline is the assertion. Run with `bash tests/e2e/run.sh`, or, once the
// server is built: `node --test tests/e2e/presence.test.mjs`.
//
// Environment: SWITCHBOARD_BIN, CHROMIUM_PATH (see harness.mjs).

import { before } from "node:test";
import assert from "node:assert/strict";
import {
  attr,
  byTest,
  contactRow,
  freePort,
  instanceLabel,
  launchBrowser,
  openPage,
  roomRow,
  signIn,
  startInstance,
  startRedis,
  step,
  stop,
  tail,
  teardown,
  until,
  waitReady,
} from "./harness.mjs";

const LEASE_MS = 1500;
const GRACE_MS = 500;
/** How long after a SIGKILL the offline event may take: lease expiry, the reap, delivery. */
const KILL_BOUND_MS = LEASE_MS + 3000;
/** How long after a clean leave or close: the grace, then delivery. */
const LEAVE_BOUND_MS = GRACE_MS + 3000;
const FLAGS = ["--lease-ms", String(LEASE_MS), "--presence-grace-ms", String(GRACE_MS)];

const pages = {}; // alice, bob
const instances = {}; // node1, node2, node3

const presenceOf = (page, user) => attr(contactRow(page, user), "data-presence");

/** The member bar of the shown room: { room, state, users }. */
function memberBar(page) {
  return byTest(page, "room-members").evaluate((bar) => ({
    hidden: bar.hidden,
    room: bar.dataset.room,
    state: bar.dataset.state,
    count: bar.querySelector('[data-testid="member-count"]').textContent,
    users: [...bar.querySelectorAll('[data-testid="member"]')].map((node) => node.dataset.user),
  }), undefined, { timeout: 1000 });
}

/** Waits until the shown room is `room` and its live member list is exactly `users`. */
async function expectMembers(who, room, users, ms = 10000) {
  const { page } = pages[who];
  const want = users.join(",");
  return until(`${who}'s ${room} members = [${want}]`, async () => {
    const bar = await memberBar(page);
    return !bar.hidden && bar.room === room && bar.state === "live" && bar.users.join(",") === want && bar;
  }, ms);
}

/** Frames of `type` the page sent after `since` (ms). */
const sentSince = (who, type, since = 0) =>
  pages[who].sent.filter(({ at, frame }) => at >= since && frame.type === type).map(({ frame }) => frame);

/** bob's presence_event frames alice's page received after `since`. */
const bobEventsSince = (since) =>
  pages.alice.received
    .filter(({ at, frame }) => at >= since && frame.type === "presence_event" && frame.user === "bob")
    .map(({ frame }) => frame);

async function joinLobby(who) {
  const { page } = pages[who];
  await byTest(page, "room-join-input").fill("lobby");
  await byTest(page, "room-join-button").click();
  await until(`${who} joined lobby`, async () => (await attr(roomRow(page, "lobby"), "data-joined")) === "yes");
}

before(async () => {
  await launchBrowser();
  await startRedis();
  for (const id of ["node1", "node2", "node3"]) instances[id] = startInstance(id, await freePort(), FLAGS);
  await Promise.all(Object.values(instances).map(waitReady));
  pages.alice = await openPage();
  pages.bob = await openPage();
});

teardown();

step("alice watches bob: offline, then online when bob connects on another instance", async () => {
  const alice = pages.alice.page;
  await signIn(alice, instances.node1.port, "alice");
  await byTest(alice, "contact-add-input").fill("bob");
  await byTest(alice, "contact-add-button").click();
  await until("bob offline on alice's page", async () => (await presenceOf(alice, "bob")) === "offline");
  const watches = sentSince("alice", "watch");
  assert.ok(watches.some((f) => f.users.includes("bob")), `alice's page watched bob: ${JSON.stringify(watches)}`);

  const connecting = Date.now();
  await signIn(pages.bob.page, instances.node2.port, "bob");
  assert.equal(await instanceLabel(pages.bob.page), "node2");
  await until("bob online on alice's page (presence_event)", async () =>
    (await presenceOf(alice, "bob")) === "online");
  assert.equal(
    await contactRow(alice, "bob").locator('[data-testid="presence-dot"]').getAttribute("data-presence"),
    "online",
  );
  assert.deepEqual(bobEventsSince(connecting).map((f) => f.online), [true], "one online event");
  assert.equal(typeof bobEventsSince(connecting)[0].ts, "number");
  assert.deepEqual(sentSince("alice", "presence"), [], "the page never polls presence");
});

step("both join lobby: each page lists alice and bob", async () => {
  await joinLobby("alice");
  await expectMembers("alice", "lobby", ["alice"]);
  await joinLobby("bob");
  await expectMembers("bob", "lobby", ["alice", "bob"]); // the members query on join
  await expectMembers("alice", "lobby", ["alice", "bob"]); // member_joined
  assert.equal(await attr(roomRow(pages.alice.page, "lobby"), "data-members"), "2");
  assert.match((await memberBar(pages.alice.page)).count, /^2 members$/);
  assert.ok(sentSince("alice", "members").some((f) => f.room === "lobby"), "alice's page asked for the members");
});

step("bob's instance is SIGKILLed: offline and out of the member list within the lease + 3 s", async () => {
  const alice = pages.alice.page;
  const killed = Date.now();
  const exit = await stop(instances.node2, "SIGKILL");
  assert.equal(exit.signal, "SIGKILL");
  await until("bob offline on alice's page after the SIGKILL", async () =>
    (await presenceOf(alice, "bob")) === "offline", KILL_BOUND_MS);
  const offlineAfter = Date.now() - killed;
  await expectMembers("alice", "lobby", ["alice"], Math.max(1000, KILL_BOUND_MS - (Date.now() - killed)));
  console.log(`# bob offline on alice's page ${offlineAfter} ms after the SIGKILL (lease ${LEASE_MS} ms)`);
  assert.equal(await attr(byTest(alice, "conn-state"), "data-state"), "connected", "alice stayed connected");
  // bob's page lost its instance: it says so and shows nothing as known.
  await until("bob's page notices the drop", async () =>
    (await attr(byTest(pages.bob.page, "conn-state"), "data-state")) !== "connected");
  assert.deepEqual(bobEventsSince(killed).map((f) => f.online), [false], "exactly one offline event");
});

step("bob reconnects to a surviving instance: online again, back in the member list", async () => {
  const alice = pages.alice.page;
  const bob = pages.bob.page;
  const back = Date.now();
  await signIn(bob, instances.node3.port, "bob");
  assert.equal(await instanceLabel(bob), "node3");
  await until("bob online again on alice's page", async () => (await presenceOf(alice, "bob")) === "online");
  await joinLobby("bob");
  await expectMembers("alice", "lobby", ["alice", "bob"]);
  await expectMembers("bob", "lobby", ["alice", "bob"]);
  assert.deepEqual(bobEventsSince(back).map((f) => f.online), [true], "exactly one online event");
});

step("alice's instance restarts: her page watches and asks again, and the events keep coming", async () => {
  const alice = pages.alice.page;
  const { port } = instances.node1;
  const exit = await stop(instances.node1, "SIGTERM");
  assert.equal(exit.code, 0, `node1 exit: ${JSON.stringify(exit)}\n${tail(instances.node1.logPath)}`);
  await until("alice's page notices the drop", async () =>
    (await attr(byTest(alice, "conn-state"), "data-state")) !== "connected");
  await until("bob's dot unknown while alice is away", async () => (await presenceOf(alice, "bob")) === "unknown");

  const restarted = Date.now();
  instances.node1 = startInstance("node1b", port, FLAGS);
  await waitReady(instances.node1);
  await until("alice's page reconnected", async () =>
    (await attr(byTest(alice, "conn-state"), "data-state")) === "connected", 20000);
  assert.equal(await instanceLabel(alice), "node1b");
  // The state comes from the new watch's reply (bob did not change).
  await until("bob online on alice's page after her reconnect", async () =>
    (await presenceOf(alice, "bob")) === "online");
  await expectMembers("alice", "lobby", ["alice", "bob"]);
  assert.ok(
    sentSince("alice", "watch", restarted).some((f) => f.users.includes("bob")),
    "a watch of bob on the new connection",
  );
  assert.ok(
    sentSince("alice", "members", restarted).some((f) => f.room === "lobby"),
    "a members query on the new connection",
  );

  // Events on the new connection: bob leaves the room, then closes his tab.
  await roomRow(pages.bob.page, "lobby").locator('[data-testid="room-leave"]').click({ force: true });
  await expectMembers("alice", "lobby", ["alice"], LEAVE_BOUND_MS);
  assert.equal(await presenceOf(alice, "bob"), "online", "leaving a room is not going offline");
  const closed = Date.now();
  await pages.bob.page.context().close();
  await until("bob offline on alice's page after he closed his tab", async () =>
    (await presenceOf(alice, "bob")) === "offline", LEAVE_BOUND_MS);
  assert.deepEqual(bobEventsSince(closed).map((f) => f.online), [false], "exactly one offline event");
});

step("no presence polling, no script errors and no CSP violations", async () => {
  assert.deepEqual(sentSince("alice", "presence"), [], "alice's page sent no presence query");
  assert.deepEqual(sentSince("bob", "presence"), [], "bob's page sent no presence query");
  assert.deepEqual(pages.alice.problems, []);
  assert.deepEqual(pages.bob.problems, []);
  assert.deepEqual(pages.alice.dialogs, []);
});
